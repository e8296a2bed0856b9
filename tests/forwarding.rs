//! Forwarding over real loopback sockets: what the upstream receives and
//! what the client gets back, byte for byte.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn injects_the_token_and_replaces_client_credentials() -> TestResult {
    let upstream = FakeUpstream::start().await;
    let (token, proxy) = proxy_to(&upstream.url(), &[]).await;

    let response = http1()
        .get(proxy.url("/api/items"))
        .header("authorization", "Basic c29tZW9uZTplbHNl")
        .header("user-agent", "python-requests/2.31")
        .header("x-custom", "kept")
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await?, "ok");

    let seen = upstream.last();
    assert_eq!(seen.header_all("authorization"), ["Bearer token-1"]);
    assert_eq!(
        seen.header_all("user-agent"),
        [concat!("bearer-proxy/", env!("CARGO_PKG_VERSION"))]
    );
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(
        seen.header_all("host"),
        [upstream.addr.to_string().as_str()]
    );

    let sent = token.requests();
    assert_eq!(sent.len(), 1);
    let form = &sent[0].form;
    assert_eq!(
        form.get("grant_type").map(String::as_str),
        Some("client_credentials")
    );
    assert_eq!(form.get("client_id").map(String::as_str), Some(CLIENT_ID));
    assert_eq!(
        form.get("client_secret").map(String::as_str),
        Some(CLIENT_SECRET)
    );
    assert_eq!(
        form.get("scope").map(String::as_str),
        Some("api://test-upstream/.default")
    );
    assert_eq!(
        sent[0].content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(sent[0].authorization, None);
    Ok(())
}

#[tokio::test]
async fn client_secret_basic_sends_the_credentials_in_the_header() -> TestResult {
    let (token, _upstream, _proxy) =
        ready_proxy(&[("BEARER_PROXY_TOKEN_AUTH_METHOD", "client_secret_basic")]).await;

    let sent = token.requests();
    let form = &sent[0].form;
    assert!(
        !form.contains_key("client_secret") && !form.contains_key("client_id"),
        "{form:?}"
    );
    let expected_id: String = form_urlencoded::byte_serialize(CLIENT_ID.as_bytes()).collect();
    let expected_secret: String =
        form_urlencoded::byte_serialize(CLIENT_SECRET.as_bytes()).collect();
    let header = sent[0].authorization.clone().unwrap_or_default();
    let encoded = header.strip_prefix("Basic ").unwrap_or_default();
    let decoded = base64_decode(encoded);
    assert_eq!(decoded, format!("{expected_id}:{expected_secret}"));
    Ok(())
}

fn base64_decode(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for byte in text.bytes().filter(|b| *b != b'=') {
        let Some(value) = ALPHABET.iter().position(|a| *a == byte) else {
            continue;
        };
        bits = (bits << 6) | value as u32;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn path_and_query_are_joined_byte_for_byte() -> TestResult {
    let upstream = FakeUpstream::start().await;
    let (_token, proxy) = ready_proxy_to(&format!("{}/base/", upstream.url()), &[]).await;

    let targets: &[&[u8]] = &[
        b"/",
        b"/a%2Fb/c",
        b"/search?q=a+b&q=c%20d&q=&flag",
        b"/caf%C3%A9/%E2%9C%93?name=J%C3%B6rg",
        b"/caf\xc3\xa9?\xc3\xa9=1",
        b"//double//slashes/",
        b"/path;matrix=1/x?a=1&a=2&b=%3D%26",
    ];
    for target in targets {
        let mut request = b"GET ".to_vec();
        request.extend_from_slice(target);
        request.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let response = raw(proxy.addr, &request).await?;
        assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(target));
        let mut expected = b"/base".to_vec();
        expected.extend_from_slice(target);
        assert_eq!(
            upstream.last().target_str(),
            String::from_utf8_lossy(&expected)
        );
    }
    Ok(())
}

#[tokio::test]
async fn methods_pass_unchanged_including_custom_ones() -> TestResult {
    let upstream = FakeUpstream::start().await;
    let (_token, proxy) = proxy_to(&upstream.url(), &[]).await;
    let client = http1();
    for method in [
        "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "PURGE", "PROPFIND",
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let response = client
            .request(method.clone(), proxy.url("/m"))
            .body(if method == "HEAD" { "" } else { "payload" })
            .send()
            .await?;
        assert_eq!(response.status(), 200, "{method}");
        let seen = upstream.last();
        assert_eq!(seen.method, method.as_str());
        if method != "HEAD" {
            assert_eq!(seen.body, b"payload", "{method}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn refused_methods_get_the_documented_errors() -> TestResult {
    let (_token, upstream, proxy) = ready_proxy(&[]).await;

    let trace = http1()
        .request(reqwest::Method::TRACE, proxy.url("/x"))
        .send()
        .await?;
    assert_proxy_error(&trace, 405, "method_not_allowed");

    let irc = raw(
        proxy.addr,
        b"GET /socket HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, close\r\nUpgrade: IRC/6.9\r\n\r\n",
    )
    .await?;
    assert_eq!(irc.status, 501);
    assert_eq!(
        irc.header("x-bearer-proxy-error"),
        Some("upgrade_not_supported")
    );
    assert!(String::from_utf8_lossy(&irc.body).contains("IRC/6.9"));

    let connect = raw(
        proxy.addr,
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(connect.status, 400);
    assert_eq!(
        connect.header("x-bearer-proxy-error"),
        Some("bad_request_target")
    );
    assert!(
        upstream.requests().is_empty(),
        "nothing refused may reach the upstream"
    );
    Ok(())
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() -> TestResult {
    let upstream = FakeUpstream::with(|_| {
        Reply::ok("ok")
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "secret-route")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-end-to-end", "stays")
    })
    .await;
    let (_token, proxy) = ready_proxy_to(&upstream.url(), &[]).await;

    let request = b"GET /h HTTP/1.1\r\nHost: localhost\r\nX-First: 1\r\nConnection: close, X-Client-Hop\r\nX-Client-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic abc\r\nTE: trailers, deflate\r\nX-Proxy-Key: local\r\nX-Repeated: a\r\nX-Last: 2\r\nX-Repeated: b\r\n\r\n";
    let response = raw(proxy.addr, request).await?;
    assert_eq!(response.status, 200);
    let seen = upstream.last();
    for name in [
        "connection",
        "x-client-hop",
        "keep-alive",
        "proxy-authorization",
        "x-proxy-key",
    ] {
        assert_eq!(seen.header(name), None, "{name} reached the upstream");
    }
    assert_eq!(
        seen.header_all("te"),
        ["trailers"],
        "TE: trailers alone is passed on"
    );
    let names: Vec<&str> = seen
        .headers
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| n.starts_with("x-"))
        .collect();
    // And the request id the proxy made.
    assert_eq!(
        names,
        [
            "x-first",
            "x-repeated",
            "x-repeated",
            "x-last",
            "x-request-id"
        ]
    );
    assert_eq!(seen.header_all("x-repeated"), ["a", "b"]);

    for name in ["x-upstream-hop", "keep-alive", "proxy-authenticate"] {
        assert_eq!(response.header(name), None, "{name} reached the client");
    }
    assert_eq!(response.header("x-end-to-end"), Some("stays"));
    Ok(())
}

#[tokio::test]
async fn location_under_the_upstream_base_points_back_at_the_proxy() -> TestResult {
    let upstream = FakeUpstream::with(|request| {
        let upstream = request.header("host").unwrap_or_default().to_owned();
        match request.target_str().as_str() {
            "/v1/absolute" => {
                Reply::status(302).header("location", &format!("http://{upstream}/v1/next?page=2"))
            }
            "/v1/path" => Reply::status(301).header("location", "/v1/moved"),
            "/v1/foreign" => {
                Reply::status(302).header("location", "https://login.example.com/v1/x")
            }
            _ => Reply::status(303).header("location", "relative/stays"),
        }
    })
    .await;
    let (_token, proxy) = proxy_to(&format!("{}/v1", upstream.url()), &[]).await;
    let client = http1();
    let location = |r: &reqwest::Response| {
        r.headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };

    let r = client.get(proxy.url("/absolute")).send().await?;
    assert_eq!(
        (r.status().as_u16(), location(&r).as_deref()),
        (302, Some("/next?page=2"))
    );
    let r = client.get(proxy.url("/path")).send().await?;
    assert_eq!(
        (r.status().as_u16(), location(&r).as_deref()),
        (301, Some("/moved"))
    );
    let r = client.get(proxy.url("/foreign")).send().await?;
    assert_eq!(
        location(&r).as_deref(),
        Some("https://login.example.com/v1/x")
    );
    let r = client.get(proxy.url("/other")).send().await?;
    assert_eq!(location(&r).as_deref(), Some("relative/stays"));
    assert_eq!(
        upstream.requests().len(),
        4,
        "redirects are passed back, never followed"
    );
    Ok(())
}

#[tokio::test]
async fn status_and_headers_and_body_pass_unchanged() -> TestResult {
    let upstream = FakeUpstream::with(|_| Reply {
        status: 418,
        headers: vec![
            ("content-type".into(), "application/octet-stream".into()),
            ("content-encoding".into(), "gzip".into()),
            ("set-cookie".into(), "a=1".into()),
            ("set-cookie".into(), "b=2".into()),
            ("etag".into(), "\"v1\"".into()),
        ],
        body: Body::Bytes(vec![0x1f, 0x8b, 0x08, 0x00, 0xff, 0x00]),
    })
    .await;
    let (_token, proxy) = proxy_to(&upstream.url(), &[]).await;
    let response = raw(proxy.addr, b"GET /teapot HTTP/1.1\r\nHost: localhost\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n").await?;
    assert_eq!(response.status, 418);
    assert_eq!(response.body, [0x1f, 0x8b, 0x08, 0x00, 0xff, 0x00]);
    assert_eq!(response.header("content-encoding"), Some("gzip"));
    let cookies: Vec<&str> = response
        .headers
        .iter()
        .filter(|(n, _)| n == "set-cookie")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(upstream.last().header("accept-encoding"), Some("gzip"));
    Ok(())
}

#[tokio::test]
async fn h2c_clients_are_served() -> TestResult {
    let upstream = FakeUpstream::start().await;
    let (_token, proxy) = proxy_to(&format!("{}/base", upstream.url()), &[]).await;
    let response = h2c()
        .post(proxy.url("/over/h2?x=1"))
        .header("user-agent", "h2-client")
        .body("h2 body")
        .send()
        .await?;
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let seen = upstream.last();
    assert_eq!(seen.target_str(), "/base/over/h2?x=1");
    assert_eq!(seen.version, 1, "the upstream speaks HTTP/1.1");
    assert_eq!(seen.body, b"h2 body");
    assert_eq!(seen.header("authorization"), Some("Bearer token-1"));
    assert_eq!(
        seen.header_all("host"),
        [upstream.addr.to_string().as_str()]
    );
    Ok(())
}

#[tokio::test]
async fn expect_continue_is_answered_by_the_proxy() -> TestResult {
    let (_token, upstream, proxy) = ready_proxy(&[]).await;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await?;
    stream
        .write_all(b"PUT /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await?;
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).await?;
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    stream.write_all(b"hello").await?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await?;
    assert_eq!(RawResponse::parse(&rest)?.status, 200);
    let seen = upstream.last();
    assert_eq!(seen.body, b"hello");
    assert_eq!(seen.header("expect"), None);
    Ok(())
}

#[tokio::test]
async fn the_status_path_answer_has_the_token_masked() -> TestResult {
    let upstream = FakeUpstream::with(|request| {
        let bearer = request.bearer();
        let body = serde_json::json!({ "status": "ok", "token": bearer, "audience": "api://test" });
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Body::Bytes(body.to_string().into_bytes()),
        }
    })
    .await;
    let (_token, proxy) = proxy_to(&upstream.url(), &[]).await;
    let response = http1()
        .get(proxy.url("/api/status"))
        .header("accept-encoding", "gzip")
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["token"], "[masked]");
    assert_eq!(body["audience"], "api://test");
    assert_eq!(
        upstream.last().header("accept-encoding"),
        None,
        "asked uncompressed to mask it"
    );

    // Other paths are not read or changed.
    let other = http1()
        .get(proxy.url("/api/status2"))
        .send()
        .await?
        .text()
        .await?;
    assert!(other.contains("token-1"));
    Ok(())
}

#[tokio::test]
async fn upstream_refusal_and_silence_get_502_and_504() -> TestResult {
    let (_held, closed) = closed_port()?;
    let (token, proxy) = proxy_to(&format!("http://{closed}"), &[]).await;
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_proxy_error(&response, 502, "upstream_unreachable");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"], "upstream_unreachable");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("refused") && message.contains(&closed.to_string()),
        "{message}"
    );

    let silent = FakeUpstream::with(|_| Reply::with_body(Body::Hang)).await;
    let proxy = start_proxy(
        &token,
        &silent.url(),
        &[("BEARER_PROXY_UPSTREAM_RESPONSE_TIMEOUT", "300ms")],
    )
    .await;
    let response = http1().post(proxy.url("/slow")).body("x").send().await?;
    assert_proxy_error(&response, 504, "upstream_timeout");
    let body: serde_json::Value = response.json().await?;
    assert_text_contains(&body, "message", "upstream.response_timeout");
    Ok(())
}

#[tokio::test]
async fn an_upstream_failure_mid_body_aborts_the_client_stream() -> TestResult {
    let upstream = FakeUpstream::with(|_| {
        Reply::with_body(Body::Truncated {
            declared: 1000,
            sent: vec![b'x'; 10],
        })
    })
    .await;
    let (_token, proxy) = proxy_to(&upstream.url(), &[]).await;
    for client in [http1(), h2c()] {
        let response = client.get(proxy.url("/partial")).send().await?;
        assert_eq!(response.status(), 200);
        assert!(
            response.bytes().await.is_err(),
            "a truncated body must not end as if complete"
        );
    }
    Ok(())
}

#[tokio::test]
async fn upload_and_download_stream_without_buffering() -> TestResult {
    let (chunks_tx, chunks_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let download = std::sync::Mutex::new(Some(chunks_rx));
    let upstream = FakeUpstream::with(move |request| {
        if request.target_str() == "/download" {
            let rx = download.lock().ok().and_then(|mut d| d.take());
            match rx {
                Some(rx) => Reply::with_body(Body::Stream(rx)),
                None => Reply::status(500),
            }
        } else {
            Reply::ok("stored")
        }
    })
    .await;
    let (_token, proxy) = ready_proxy_to(&upstream.url(), &[]).await;

    // Upload: the upstream has the first chunk before the client sends the second.
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let client = http1();
    let upload = tokio::spawn(
        client
            .post(proxy.url("/upload"))
            .body(channel_body(body_rx))
            .send(),
    );
    body_tx.send(Ok(vec![b'a'; 1000])).await?;
    let mut progress = upstream.progress.clone();
    tokio::time::timeout(Duration::from_secs(5), progress.wait_for(|n| *n >= 1000)).await??;
    body_tx.send(Ok(vec![b'b'; 500])).await?;
    drop(body_tx);
    let response = upload.await??;
    assert_eq!(response.text().await?, "stored");
    let seen = upstream.last();
    assert_eq!(seen.body_len, 1500);
    assert!(seen.chunked, "a body of unknown length is sent chunked");

    // Download: the client reads the first chunk before the upstream sends the second.
    let mut response = http1().get(proxy.url("/download")).send().await?;
    chunks_tx.send(b"first".to_vec()).await?;
    let first = tokio::time::timeout(Duration::from_secs(5), response.chunk()).await??;
    assert_eq!(first.as_deref(), Some(&b"first"[..]));
    chunks_tx.send(b"second".to_vec()).await?;
    drop(chunks_tx);
    let second = response.chunk().await?;
    assert_eq!(second.as_deref(), Some(&b"second"[..]));
    assert_eq!(response.chunk().await?, None);
    Ok(())
}

#[tokio::test]
async fn an_upload_that_keeps_moving_is_not_cut_and_one_that_stalls_is() -> TestResult {
    let upstream = FakeUpstream::start().await;
    let timeout = [("BEARER_PROXY_UPSTREAM_RESPONSE_TIMEOUT", "300ms")];
    let (token, proxy) = ready_proxy_to(&upstream.url(), &timeout).await;

    // Six pieces 100 ms apart: 600 ms in all, never 300 ms without progress.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if tx.send(Ok(vec![b'x'; 1024])).await.is_err() {
                return;
            }
        }
    });
    let response = http1()
        .post(proxy.url("/slow-upload"))
        .body(channel_body(rx))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().body_len, 6 * 1024);

    // An upstream that accepts the connection but never reads nor answers.
    let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let stuck_addr = stuck.local_addr()?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = stuck.accept().await {
            held.push(socket);
        }
    });
    let proxy = start_proxy(&token, &format!("http://{stuck_addr}"), &timeout).await;
    wait_ready(&proxy).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let piece = vec![b'y'; 256 * 1024];
        for _ in 0..256 {
            if tx.send(Ok(piece.clone())).await.is_err() {
                return;
            }
        }
    });
    let started = std::time::Instant::now();
    let response = http1()
        .post(proxy.url("/stuck"))
        .body(channel_body(rx))
        .send()
        .await?;
    assert_eq!(response.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(5));
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"], "upstream_timeout");
    assert_text_contains(&body, "message", "stopped moving");
    Ok(())
}

#[tokio::test]
async fn targets_that_could_leave_the_upstream_base_are_refused() -> TestResult {
    let upstream = FakeUpstream::start().await;
    let (_token, proxy) = ready_proxy_to(&format!("{}/v1", upstream.url()), &[]).await;
    let refused: &[&[u8]] = &[
        b"GET http://evil.example/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"GET /../admin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"GET /a/%2E%2e/admin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"GET /./x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    ];
    for request in refused {
        let response = raw(proxy.addr, request).await?;
        let shown = String::from_utf8_lossy(request);
        assert_eq!(response.status, 400, "{shown}");
        assert_eq!(
            response.header("x-bearer-proxy-error"),
            Some("bad_request_target"),
            "{shown}"
        );
        let body: serde_json::Value = serde_json::from_slice(&response.body)?;
        assert_eq!(body["error"], "bad_request_target");
    }
    assert!(
        upstream.requests().is_empty(),
        "nothing refused reached the upstream"
    );

    // Absolute form naming the proxy itself, X-Forwarded-Host, and a path
    // that looks like an authority all stay on the upstream.
    let allowed: &[&[u8]] = &[
        b"GET http://localhost/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"GET /y HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n",
        b"GET //evil.example/z HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    ];
    for request in allowed {
        assert_eq!(raw(proxy.addr, request).await?.status, 200);
    }
    let targets: Vec<String> = upstream
        .requests()
        .iter()
        .map(Recorded::target_str)
        .collect();
    assert_eq!(targets, ["/v1/x", "/v1/y", "/v1//evil.example/z"]);
    Ok(())
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() -> TestResult {
    let upstream = FakeUpstream::start().await;
    // Ready: the worker's warm connection is open, so that the first
    // request does not race it with a connection of its own.
    let (_token, proxy) =
        ready_proxy_to(&upstream.url(), &[("BEARER_PROXY_PROXY_WORKERS", "1")]).await;

    // One client connection, then a new client connection per request: the
    // worker's pool serves every request over the first upstream connection.
    let client = http1();
    for _ in 0..10 {
        let response = client.get(proxy.url("/a")).send().await?;
        assert_eq!(response.status(), 200);
        response.bytes().await?;
    }
    for _ in 0..10 {
        let response = raw(
            proxy.addr,
            b"GET /b HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .await?;
        assert_eq!(response.status, 200);
    }
    assert_eq!(upstream.requests().len(), 20);
    assert_eq!(upstream.connections(), 1);
    Ok(())
}

#[tokio::test]
async fn requests_with_and_without_a_body_share_the_upstream_connections() -> TestResult {
    let upstream = FakeUpstream::start().await;
    // Ready, as above: the warm connection is the one they share.
    let (_token, proxy) =
        ready_proxy_to(&upstream.url(), &[("BEARER_PROXY_PROXY_WORKERS", "1")]).await;
    let client = http1();
    // Sized, chunked and empty bodies, and none, one after the other: one
    // pool, so one upstream connection carries them all.
    for round in 0..3 {
        let response = client
            .post(proxy.url("/sized"))
            .body(format!("round {round}"))
            .send()
            .await?;
        assert_eq!(response.status(), 200);
        response.bytes().await?;
        let (body_tx, body_rx) = tokio::sync::mpsc::channel(2);
        body_tx.send(Ok(b"chunk one ".to_vec())).await?;
        body_tx.send(Ok(b"chunk two".to_vec())).await?;
        drop(body_tx);
        let response = client
            .put(proxy.url("/chunked"))
            .body(channel_body(body_rx))
            .send()
            .await?;
        assert_eq!(response.status(), 200);
        response.bytes().await?;
        let response = client.get(proxy.url("/none")).send().await?;
        assert_eq!(response.status(), 200);
        response.bytes().await?;
    }
    let requests = upstream.requests();
    assert_eq!(requests.len(), 9);
    let chunked = requests
        .iter()
        .find(|r| r.target_str() == "/chunked")
        .expect("the chunked upload");
    assert!(chunked.chunked, "{chunked:?}");
    assert_eq!(chunked.body, b"chunk one chunk two");
    assert_eq!(chunked.header("content-length"), None);
    let sized = requests
        .iter()
        .find(|r| r.target_str() == "/sized")
        .expect("the sized upload");
    assert_eq!(sized.header("content-length"), Some("7"));
    assert_eq!(sized.body, b"round 0");
    assert_eq!(upstream.connections(), 1);
    Ok(())
}

#[tokio::test]
async fn an_upstream_connection_closed_while_idle_is_not_reused() -> TestResult {
    // An upstream that answers one request per connection, then closes it
    // without saying so (no `Connection: close`), as servers with a short
    // keep-alive timeout do.
    let (addr, accepted) = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await?;
    // No warm connection: one opened ahead (at start, or a second later to
    // replace the one the upstream closed) would count as a sixth.
    let workers = [
        ("BEARER_PROXY_PROXY_WORKERS", "1"),
        ("BEARER_PROXY_UPSTREAM_KEEP_WARM", "false"),
    ];
    let (_token, proxy) = proxy_to(&format!("http://{addr}"), &workers).await;
    let client = http1();
    for _ in 0..5 {
        let response = client.get(proxy.url("/")).send().await?;
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await?, "ok");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 5);
    Ok(())
}

#[tokio::test]
async fn a_connection_still_taking_an_upload_is_not_given_to_the_next_request() -> TestResult {
    // An upstream that refuses uploads at once (413) but keeps reading them,
    // and answers GETs: the refused upload keeps its connection busy.
    let (addr, _) = raw_upstream(|mut stream, head| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if head.starts_with(b"POST") {
            let _ = stream
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
                .await;
            // Keeps reading what the proxy still sends.
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        } else {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    })
    .await?;
    let workers = [("BEARER_PROXY_PROXY_WORKERS", "1")];
    let (_token, proxy) = proxy_to(&format!("http://{addr}"), &workers).await;

    // A streamed upload that sends one piece and then holds.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Ok(vec![b'x'; 1024])).await?;
    let refused = http1()
        .post(proxy.url("/upload"))
        .body(channel_body(rx))
        .send()
        .await?;
    assert_eq!(refused.status(), 413);

    // The next request must not wait for that upload to end.
    let next = tokio::time::timeout(
        Duration::from_secs(5),
        http1().get(proxy.url("/next")).send(),
    )
    .await??;
    assert_eq!(next.status(), 200);
    assert_eq!(next.text().await?, "ok");
    drop(tx);
    Ok(())
}

#[tokio::test]
async fn an_invalid_upstream_answer_is_a_502_that_says_so() -> TestResult {
    // Two Content-Length values that disagree: the body's end is unknown.
    let (addr, _) = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok").await?;
    let (_token, proxy) = proxy_to(&format!("http://{addr}"), &[]).await;
    for client in [http1(), h2c()] {
        let response = client.get(proxy.url("/")).send().await?;
        assert_eq!(response.status(), 502);
        let body: serde_json::Value = response.json().await?;
        assert_eq!(body["error"], "upstream_unreachable");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("sent an invalid response") && message.contains("Content-Length"),
            "{message}"
        );
    }
    Ok(())
}

/// An upstream that answers 200 `early` as soon as it has a request's
/// head, then reads the body to its Content-Length (pausing `pause`
/// before each read), and reports how much of a body came.
async fn answering_early(
    pause: Duration,
) -> std::io::Result<(
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<usize>,
)> {
    let (got_tx, got_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let (addr, _) = raw_upstream(move |mut stream, head| {
        let got_tx = got_tx.clone();
        async move {
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let length: usize = text
                .split("content-length: ")
                .nth(1)
                .and_then(|rest| rest.split("\r\n").next())
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            let end = head
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(0, |at| at + 4);
            let mut got = head.len() - end;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
                .await;
            if length == 0 {
                return;
            }
            let mut buf = vec![0u8; 256 * 1024];
            while got < length {
                tokio::time::sleep(pause).await;
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            let _ = got_tx.send(got);
        }
    })
    .await?;
    Ok((addr, got_rx))
}

#[tokio::test]
async fn an_upstream_that_answers_early_still_gets_the_whole_upload() -> TestResult {
    let (addr, mut got_rx) = answering_early(Duration::ZERO).await?;
    let (_token, proxy) = ready_proxy_to(&format!("http://{addr}"), &[]).await;
    let body = vec![b'u'; 1024 * 1024];
    let response = http1()
        .post(proxy.url("/early"))
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await?, "early");
    let got = tokio::time::timeout(Duration::from_secs(10), got_rx.recv()).await?;
    assert_eq!(got, Some(body.len()));
    Ok(())
}

#[tokio::test]
async fn an_upload_still_being_sent_after_its_answer_holds_its_capacity() -> TestResult {
    // Reads the body slowly: it outlasts the answer.
    let (addr, mut done_rx) = answering_early(Duration::from_millis(20)).await?;
    let (_token, proxy) = ready_proxy_to(
        &format!("http://{addr}"),
        &[("BEARER_PROXY_PROXY_MAX_CONCURRENT", "1")],
    )
    .await;
    let response = http1()
        .post(proxy.url("/slow"))
        .body(vec![b'u'; 16 * 1024 * 1024])
        .send()
        .await?;
    assert_eq!(response.text().await?, "early");
    // The answer is over, the upload is not: the one place is still taken.
    let busy = raw(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(busy.header("x-bearer-proxy-error"), Some("overloaded"));
    let got = tokio::time::timeout(Duration::from_secs(30), done_rx.recv()).await?;
    assert_eq!(got, Some(16 * 1024 * 1024));
    Ok(())
}
