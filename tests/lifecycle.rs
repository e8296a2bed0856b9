//! The token's life over real sockets: a provider down at start, throttling,
//! an upstream that refuses a token, and bursts after a forced renewal.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Fast retries so the tests run in seconds.
const FAST: [(&str, &str); 3] = [
    ("BEARER_PROXY_TOKEN_RETRY_INITIAL", "200ms"),
    ("BEARER_PROXY_TOKEN_RETRY_MAX", "400ms"),
    ("BEARER_PROXY_TOKEN_STARTUP_WAIT", "0s"),
];

#[tokio::test]
async fn a_provider_down_at_start_gives_503_then_recovers_without_restart() -> TestResult {
    // The token URL names a port on which nothing listens yet.
    let (socket, addr) = closed_port()?;
    let token_url = format!("http://{addr}/test-tenant/oauth2/v2.0/token");
    let upstream = FakeUpstream::start().await;
    let mut extra = FAST.to_vec();
    extra.push(("API_TOKEN_URL", &token_url));
    let placeholder = FakeTokenEndpoint::start().await;
    let proxy = start_proxy(&placeholder, &upstream.url(), &extra).await;

    let admin = proxy.admin_url("/status");
    for _ in 0..500 {
        let status: serde_json::Value = http1().get(&admin).send().await?.json().await?;
        if status["token"]["consecutive_failures"]
            .as_u64()
            .unwrap_or_default()
            >= 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_proxy_error(&response, 503, "token_unavailable");
    assert!(response.headers()["retry-after"].to_str()?.parse::<u64>()? >= 1);
    let body: serde_json::Value = response.json().await?;
    assert_text_contains(&body, "message", "cannot reach the token endpoint");
    let readyz = http1().get(proxy.admin_url("/readyz")).send().await?;
    assert_eq!(readyz.status(), 503);
    let readyz: serde_json::Value = readyz.json().await?;
    assert_text_contains(&readyz, "reason", "no token yet");
    let status = proxy.status().await?;
    assert_eq!(status["token"]["last_error"]["code"], "connect_failed");
    assert!(
        status["token"]["consecutive_failures"]
            .as_u64()
            .unwrap_or_default()
            >= 1
    );

    // The provider comes up on that port: ready again, no restart.
    let token = FakeTokenEndpoint::start_on(socket.listen(64)?);
    wait_ready(&proxy).await;
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        upstream.last().header("authorization"),
        Some("Bearer token-1")
    );
    assert_eq!(token.count(), 1);
    Ok(())
}

#[tokio::test]
async fn retry_after_holds_the_next_token_request_back() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    token.script([TokenReply::Raw {
        status: 429,
        body: r#"{"error":"temporarily_unavailable","error_description":"AADSTS50196: The server terminated an operation because it encountered a client request loop.","error_codes":[50196]}"#.into(),
        headers: vec![("retry-after".into(), "2".into())],
    }]);
    let (_upstream, proxy) = proxy_with_token(&token, &FAST).await;
    until(|| token.count() == 1, "the first token request").await?;
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_eq!(response.status(), 503);
    let retry_after: u64 = response.headers()["retry-after"].to_str()?.parse()?;
    assert!((1..=2).contains(&retry_after), "{retry_after}");

    wait_ready(&proxy).await;
    let requests = token.requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_secs(2),
        "the second request came {gap:?} after a 429 with Retry-After: 2"
    );
    assert!(gap < Duration::from_secs(3), "{gap:?}");
    Ok(())
}

/// An upstream that refuses the first token with 401 and accepts later ones.
async fn refusing_first_token() -> FakeUpstream {
    FakeUpstream::with(|request| {
        if request.header("authorization") == Some("Bearer token-1") {
            Reply::status(401).header("www-authenticate", "Bearer error=\"invalid_token\"")
        } else {
            Reply::ok("accepted")
        }
    })
    .await
}

#[tokio::test]
async fn a_401_is_replayed_once_with_a_new_token() -> TestResult {
    let upstream = refusing_first_token().await;
    let (token, proxy) = ready_proxy_to(&upstream.url(), &[]).await;

    let response = http1().get(proxy.url("/items?x=1")).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await?, "accepted");
    let seen = upstream.requests();
    let tokens: Vec<_> = seen
        .iter()
        .map(|r| r.header("authorization").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(tokens, ["Bearer token-1", "Bearer token-2"]);
    assert!(seen.iter().all(|r| r.target_str() == "/items?x=1"));
    assert_eq!(token.count(), 2);

    // The new token is held now: the next request goes once, accepted.
    let response = http1()
        .post(proxy.url("/orders"))
        .body("{\"qty\":2}")
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().body, b"{\"qty\":2}");
    let status = proxy.status().await?;
    assert_eq!(status["token"]["forced_renewals"], 1);
    Ok(())
}

/// A request without a body (the lean path, its fields as they arrived)
/// and one with a body (hyper's server and a header map) reach the
/// upstream with the same fields in the same order, also when replayed
/// with a new token.
#[tokio::test]
async fn both_paths_send_the_same_fields_upstream_also_on_a_replay() -> TestResult {
    let upstream = refusing_first_token().await;
    let (_token, proxy) = ready_proxy_to(&upstream.url(), &[]).await;
    let fields = format!(
        "host: LOCALHOST:{}\r\nX-B: 1\r\nuser-agent: curl/8\r\nAccept: */*\r\nX-b: 2\r\n\
         Authorization: Basic abc\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: p\r\n\
         AUTHORIZATION: Basic def\r\nUser-Agent: other\r\nX-Empty:\r\nCookie: a=1\r\n\
         Connection: close\r\n",
        proxy.addr.port()
    );
    let lean = raw(
        proxy.addr,
        format!("GET /lean HTTP/1.1\r\n{fields}\r\n").as_bytes(),
    )
    .await?;
    let hyper = raw(
        proxy.addr,
        format!("POST /hyper HTTP/1.1\r\n{fields}Content-Length: 3\r\n\r\nabc").as_bytes(),
    )
    .await?;
    assert_eq!((lean.status, hyper.status), (200, 200));
    let seen = upstream.requests();
    let targets: Vec<String> = seen.iter().map(Recorded::target_str).collect();
    assert_eq!(targets, ["/lean", "/lean", "/hyper"]);
    let fields_of = |at: usize, token: &str| {
        seen[at]
            .headers
            .iter()
            .filter(|(name, _)| name != "content-length")
            .map(|(name, value)| {
                let value = match name.as_str() {
                    "authorization" => token,
                    "x-request-id" => "(made by the proxy)",
                    _ => value,
                };
                format!("{name}: {value}")
            })
            .collect::<Vec<_>>()
    };
    let expected = [
        format!("host: {}", upstream.addr),
        "x-b: 1".to_owned(),
        "x-b: 2".to_owned(),
        format!("user-agent: bearer-proxy/{}", env!("CARGO_PKG_VERSION")),
        "accept: */*".to_owned(),
        "authorization: Bearer token-2".to_owned(),
        "x-empty: ".to_owned(),
        "cookie: a=1".to_owned(),
        "te: trailers".to_owned(),
        "x-request-id: (made by the proxy)".to_owned(),
    ];
    assert_eq!(fields_of(2, "Bearer token-2"), expected);
    assert_eq!(fields_of(1, "Bearer token-2"), expected);
    assert_eq!(fields_of(0, "Bearer token-2"), expected);
    assert_eq!(seen[0].bearer(), "token-1");
    assert_eq!(seen[1].bearer(), "token-2");
    // The replay is the same request: the same id.
    assert_eq!(
        seen[0].header("x-request-id"),
        seen[1].header("x-request-id")
    );
    assert_ne!(
        seen[1].header("x-request-id"),
        seen[2].header("x-request-id")
    );
    Ok(())
}

#[tokio::test]
async fn a_small_post_is_replayed_with_the_same_body() -> TestResult {
    let upstream = refusing_first_token().await;
    let (_token, proxy) = ready_proxy_to(&upstream.url(), &[]).await;

    let payload = vec![b'p'; 60 * 1024];
    let response = http1()
        .post(proxy.url("/upload"))
        .body(payload.clone())
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("authorization"), Some("Bearer token-1"));
    assert_eq!(seen[1].header("authorization"), Some("Bearer token-2"));
    assert_eq!(seen[0].body, payload);
    assert_eq!(
        seen[1].body, payload,
        "the upstream receives the same body twice"
    );
    assert_eq!(seen[1].header("content-length"), Some("61440"));
    Ok(())
}

#[tokio::test]
async fn large_streamed_or_expecting_bodies_are_never_replayed() -> TestResult {
    let upstream =
        FakeUpstream::with(|_| Reply::status(401).header("www-authenticate", "Bearer")).await;
    let (token, proxy) = ready_proxy_to(&upstream.url(), &[]).await;

    // Larger than proxy.replay_buffer (64 KiB).
    let response = http1()
        .post(proxy.url("/big"))
        .body(vec![b'b'; 65 * 1024])
        .send()
        .await?;
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    // Streamed: no Content-Length.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Ok(b"small but streamed".to_vec())).await?;
    drop(tx);
    let response = http1()
        .post(proxy.url("/streamed"))
        .body(channel_body(rx))
        .send()
        .await?;
    assert_eq!(response.status(), 401);
    // Expect: 100-continue.
    let request = b"PUT /expect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\nok";
    let response = raw(proxy.addr, request).await?;
    assert_eq!(response.status, 401);

    let targets: Vec<String> = upstream
        .requests()
        .iter()
        .map(Recorded::target_str)
        .collect();
    assert_eq!(targets, ["/big", "/streamed", "/expect"], "each sent once");
    // The first 401 asked for a new token (without waiting for it); the next
    // ones came within token.min_forced_interval and asked for none.
    until(|| token.count() == 2, "the renewal after the first 401").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(token.count(), 2);
    Ok(())
}

#[tokio::test]
async fn a_misconfigured_upstream_cannot_make_renewals_loop() -> TestResult {
    let upstream = FakeUpstream::with(|_| Reply::status(401)).await;
    let (token, proxy) = ready_proxy_to(&upstream.url(), &[]).await;
    for _ in 0..5 {
        assert_eq!(http1().get(proxy.url("/x")).send().await?.status(), 401);
    }
    // First request: one forced renewal and one replay, itself refused. The
    // next four: renewal declined (30 s min_forced_interval), 401 passed on.
    assert_eq!(token.count(), 2);
    assert_eq!(upstream.requests().len(), 6);
    Ok(())
}

#[tokio::test]
async fn a_burst_after_a_forced_renewal_causes_one_token_request() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    token.delay(Duration::from_millis(200));
    let upstream = refusing_first_token().await;
    let proxy = start_proxy(&token, &upstream.url(), &[]).await;
    wait_ready(&proxy).await;

    let client = h2c();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        tasks.push(tokio::spawn(
            client.get(proxy.url(&format!("/burst/{i}"))).send(),
        ));
    }
    for task in tasks {
        assert_eq!(task.await??.status(), 200);
    }
    assert_eq!(token.count(), 2, "the first token and one forced renewal");
    assert_eq!(token.max_in_flight(), 1);
    let accepted = upstream
        .requests()
        .iter()
        .filter(|r| r.header("authorization") == Some("Bearer token-2"))
        .count();
    assert_eq!(accepted, 1000);
    assert!(started.elapsed() < Duration::from_secs(20));
    Ok(())
}
