//! The token as requests see it: one request for many clients, waiting for
//! the first token, readiness, failures, and the secret file read afresh.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn a_hundred_requests_at_a_cold_start_cause_one_token_request() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    token.delay(Duration::from_millis(300));
    let (upstream, proxy) = proxy_with_token(&token, &[]).await;

    let client = http1();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let request = client.get(proxy.url(&format!("/item/{i}"))).send();
        tasks.push(tokio::spawn(request));
    }
    for task in tasks {
        assert_eq!(task.await??.status(), 200);
    }
    assert_eq!(token.count(), 1);
    assert_eq!(token.max_in_flight(), 1);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 100);
    assert!(
        requests
            .iter()
            .all(|r| r.header("authorization") == Some("Bearer token-1"))
    );
    Ok(())
}

#[tokio::test]
async fn readiness_follows_the_first_token() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    token.delay(Duration::from_millis(500));
    let (upstream, proxy) = proxy_with_token(&token, &[]).await;
    let client = http1();

    assert_eq!(
        client
            .get(proxy.admin_url("/healthz"))
            .send()
            .await?
            .status(),
        200
    );
    let before = client.get(proxy.admin_url("/readyz")).send().await?;
    assert_eq!(before.status(), 503);
    let body: serde_json::Value = before.json().await?;
    assert_eq!(body["ready"], false);
    assert_text_contains(&body, "reason", "no token yet");

    wait_ready(&proxy).await;
    let body: serde_json::Value = client
        .get(proxy.admin_url("/readyz"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(body, serde_json::json!({ "ready": true }));

    let status: serde_json::Value = client
        .get(proxy.admin_url("/status"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(status["token"]["present"], true);
    assert_eq!(status["upstream"], upstream.url());
    let expires = status["token"]["expires_in_s"].as_u64().unwrap_or_default();
    assert!((3590..=3599).contains(&expires), "{status}");
    assert!(
        status["token"]["next_refresh_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{status}"
    );
    assert_eq!(status["token"]["consecutive_failures"], 0);
    let text = status.to_string();
    assert!(
        !text.contains("token-1") && !text.contains(CLIENT_SECRET),
        "/status leaks: {text}"
    );

    // The proxy port serves no admin route: it forwards.
    client.get(proxy.url("/readyz")).send().await?;
    assert_eq!(upstream.last().target_str(), "/readyz");
    Ok(())
}

#[tokio::test]
async fn requests_wait_up_to_startup_wait_for_a_slow_first_token() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    token.delay(Duration::from_secs(2));
    let wait = [("BEARER_PROXY_TOKEN_STARTUP_WAIT", "300ms")];
    let (upstream, proxy) = proxy_with_token(&token, &wait).await;
    let started = std::time::Instant::now();
    let response = http1().get(proxy.url("/x")).send().await?;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
    assert_proxy_error(&response, 503, "token_unavailable");
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await?;
    assert_text_contains(&body, "message", "has not completed");
    assert!(upstream.requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn a_failed_first_token_gives_503_token_unavailable_at_once() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    token.script([TokenReply::Raw {
        status: 503,
        body: r#"{"error":"temporarily_unavailable","error_description":"AADSTS50196: busy","error_codes":[50196]}"#.into(),
        headers: vec![("retry-after".into(), "7".into())],
    }]);
    let (upstream, proxy) =
        proxy_with_token(&token, &[("BEARER_PROXY_TOKEN_STARTUP_WAIT", "3s")]).await;
    until(|| token.count() == 1, "the first token request").await?;

    // The next attempt (Retry-After: 7) is after the startup wait: no token
    // can come in time, so the request is not held for 3 s.
    let started = std::time::Instant::now();
    let response = http1().get(proxy.url("/x")).send().await?;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_proxy_error(&response, 503, "token_unavailable");
    let retry_after: u64 = response.headers()["retry-after"].to_str()?.parse()?;
    assert!((1..=7).contains(&retry_after), "retry-after {retry_after}");
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"], "token_unavailable");
    assert_text_contains(&body, "message", "AADSTS50196");
    assert!(upstream.requests().is_empty());

    let status = proxy.status().await?;
    assert_eq!(status["token"]["present"], false);
    assert_eq!(status["token"]["consecutive_failures"], 1);
    assert_eq!(
        status["token"]["last_error"]["code"],
        "temporarily_unavailable"
    );
    assert_eq!(
        status["token"]["last_error"]["provider_code"],
        "AADSTS50196"
    );
    let readyz = http1().get(proxy.admin_url("/readyz")).send().await?;
    assert_eq!(readyz.status(), 503);
    assert_eq!(
        token.count(),
        1,
        "Retry-After: 7 holds the next attempt back"
    );
    Ok(())
}

#[tokio::test]
async fn the_secret_file_is_read_afresh_for_each_token() -> TestResult {
    let dir = std::env::temp_dir().join(format!("bearer-proxy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("secret");
    std::fs::write(&file, "first-secret\n")?;
    let token = FakeTokenEndpoint::start().await;
    // A 2 s token is renewed 1.6 s after it was requested.
    token.script([TokenReply::Ok { expires_in: 2 }]);
    let upstream = FakeUpstream::start().await;
    let mut env = env_for(
        &token,
        &upstream.url(),
        &[("API_CLIENT_SECRET_FILE", file.to_str().unwrap_or_default())],
    );
    env.remove("API_CLIENT_SECRET");
    let config = bearer_proxy::Config::load(&bearer_proxy::config::Flags::default(), &env)?;
    let listeners = bearer_proxy::Listeners {
        proxy: tokio::net::TcpListener::bind("127.0.0.1:0").await?.into(),
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(bearer_proxy::run(config, listeners, shutdown.clone()));

    until(|| token.count() == 1, "the first token request").await?;
    std::fs::write(&file, "second-secret\r\n")?;
    until(|| token.count() >= 2, "the renewal 1.6 s later").await?;
    let secrets: Vec<String> = token
        .requests()
        .iter()
        .map(|r| r.form.get("client_secret").cloned().unwrap_or_default())
        .collect();
    assert_eq!(secrets, ["first-secret", "second-secret"]);
    shutdown.cancel();
    task.await??;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Any OAuth2 provider: no scope where the provider wants none, and the
/// form fields it wants instead (Auth0's `audience`, the v1 endpoint's
/// `resource`), checked field by field as the endpoint received them.
#[tokio::test]
async fn the_scope_may_be_left_out_and_extra_fields_added() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    let (_upstream, proxy) = proxy_with_token(
        &token,
        &[
            ("API_SCOPE", "none"),
            (
                "BEARER_PROXY_TOKEN_EXTRA_PARAMS",
                "audience=https://api.example.com/, resource=api://kalibrate",
            ),
        ],
    )
    .await;
    wait_ready(&proxy).await;
    let sent = token.requests();
    let form = &sent.first().ok_or("no token request")?.form;
    assert_eq!(
        form.get("grant_type").map(String::as_str),
        Some("client_credentials")
    );
    assert_eq!(form.get("scope"), None, "{form:?}");
    assert_eq!(
        form.get("audience").map(String::as_str),
        Some("https://api.example.com/")
    );
    assert_eq!(
        form.get("resource").map(String::as_str),
        Some("api://kalibrate")
    );
    assert_eq!(form.get("client_id").map(String::as_str), Some(CLIENT_ID));
    assert_eq!(
        form.get("client_secret").map(String::as_str),
        Some(CLIENT_SECRET)
    );
    assert_eq!(form.len(), 5, "{form:?}");
    Ok(())
}

#[test]
fn extra_fields_may_not_replace_the_grants_own() {
    for bad in ["client_secret=x", "scope=y", "noequals", "=v", "a b=c"] {
        let env = [
            ("API_CLIENT_ID", "a"),
            ("API_CLIENT_SECRET", "b"),
            ("BEARER_PROXY_TOKEN_EXTRA_PARAMS", bad),
        ];
        let error =
            bearer_proxy::config::Config::load(&bearer_proxy::config::Flags::default(), &env[..])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
        assert!(
            error.contains("token.extra_params") && error.contains("name=value"),
            "{bad}: {error}"
        );
    }
}
