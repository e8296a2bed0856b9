//! The admin listener's status page (`/`) and the request counts in
//! `/status`, in the states that matter: no token yet, ready, and the
//! credentials rejected.

mod support;

use support::*;

async fn page(proxy: &Proxy) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let text = admin_text(proxy, "/", "text/html; charset=utf-8").await?;
    // Plain HTML that reloads itself, with nothing fetched from elsewhere.
    assert!(
        text.contains("<meta http-equiv=\"refresh\" content=\"5\">"),
        "{text}"
    );
    for absent in [
        "<script",
        "src=",
        "<link",
        "@import",
        CLIENT_SECRET,
        "token-1",
    ] {
        assert!(!text.contains(absent), "{absent} in the page:\n{text}");
    }
    Ok(text)
}

#[tokio::test]
async fn before_the_first_token_the_page_says_what_is_missing() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    token.set_down(true);
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(&token, &upstream.url(), &[]).await;
    let text = page(&proxy).await?;
    assert!(
        text.contains("<title>bearer-proxy: not ready</title>"),
        "{text}"
    );
    assert!(text.contains("Not ready: no token yet"), "{text}");
    assert!(text.contains("none yet"), "{text}");
    assert!(text.contains(&upstream.url()), "{text}");
    Ok(())
}

#[tokio::test]
async fn when_ready_the_page_and_status_count_the_requests() -> TestResult {
    let (_token, _upstream, proxy) = ready_proxy(&[]).await;
    for _ in 0..3 {
        http1().get(proxy.url("/x")).send().await?.bytes().await?;
    }
    let refused = http1()
        .get(proxy.url("/x"))
        .header("host", "evil.example")
        .send()
        .await?;
    assert_eq!(refused.status(), 403);
    refused.bytes().await?;
    let text = page(&proxy).await?;
    assert!(text.contains("Ready: a valid token is held."), "{text}");
    assert!(text.contains("<tr><th>expires in</th><td>59m"), "{text}");
    assert!(text.contains("4 answered since start"), "{text}");
    assert!(text.contains("<tr><th>2xx</th><td>3</td></tr>"), "{text}");
    assert!(
        text.contains("<tr><th><code>host_not_allowed</code></th><td>1</td></tr>"),
        "{text}"
    );
    assert!(text.contains(concat!("bearer-proxy ", env!("CARGO_PKG_VERSION"))));
    let status = proxy.status().await?;
    let requests = &status["requests"];
    assert_eq!(requests["total"], 4, "{status}");
    assert_eq!(requests["by_status_class"]["2xx"], 3);
    assert_eq!(requests["by_status_class"]["4xx"], 1);
    assert_eq!(requests["by_code"]["host_not_allowed"], 1);
    assert_eq!(requests["in_flight"], 0);
    Ok(())
}

#[tokio::test]
async fn rejected_credentials_are_on_the_page_with_their_hint() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    token.script([TokenReply::invalid_secret()]);
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(&token, &upstream.url(), &[]).await;
    until(|| token.count() >= 1, "a token request").await?;
    let mut text = page(&proxy).await?;
    for _ in 0..100 {
        if text.contains("AADSTS7000215") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        text = page(&proxy).await?;
    }
    assert!(
        text.contains("<code>invalid_client</code> <code>AADSTS7000215</code>"),
        "{text}"
    );
    assert!(text.contains("value, not its id"), "the hint: {text}");
    assert!(
        text.contains("<tr><th>failures in a row</th><td>1</td></tr>"),
        "{text}"
    );
    assert!(text.contains("Not ready"), "{text}");
    Ok(())
}
