//! Forward proxies: with HTTPS_PROXY set, the token endpoint (over TLS) and
//! the upstream are both reached through CONNECT tunnels; with NO_PROXY
//! covering them, neither is.

mod support;

use std::sync::{Arc, Mutex};

use support::pki::{Pki, tls_front};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A tunnel's (or forwarded request's) target and its Proxy-Authorization.
type Tunnel = (String, Option<String>);

/// A CONNECT proxy that records each tunnel's target and Proxy-Authorization.
#[derive(Clone, Default)]
struct FakeProxy {
    tunnels: Arc<Mutex<Vec<Tunnel>>>,
}

impl FakeProxy {
    async fn start(&self) -> std::io::Result<std::net::SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let tunnels = self.tunnels.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tunnels = tunnels.clone();
                tokio::spawn(async move {
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.is_err() {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or_default().to_owned();
                    let raw_target = parts.next().unwrap_or_default().to_owned();
                    let mut head = line.clone();
                    let mut auth = None;
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).await.is_err() || header.is_empty() {
                            break;
                        }
                        head.push_str(&header);
                        if header == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = header.split_once(':')
                            && name.eq_ignore_ascii_case("proxy-authorization")
                        {
                            auth = Some(value.trim().to_owned());
                        }
                    }
                    // CONNECT host:port opens a tunnel; any other method is a
                    // request in absolute form, forwarded to its host.
                    let target = if method == "CONNECT" {
                        raw_target
                    } else {
                        raw_target
                            .parse::<http::Uri>()
                            .ok()
                            .and_then(|u| u.authority().map(|a| a.to_string()))
                            .unwrap_or_default()
                    };
                    if let Ok(mut tunnels) = tunnels.lock() {
                        tunnels.push((target.clone(), auth));
                    }
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    // Bytes read past the head (a request body) go along too.
                    let buffered = reader.buffer().to_vec();
                    let mut client = reader.into_inner();
                    if method == "CONNECT" {
                        if client
                            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    } else if upstream.write_all(head.as_bytes()).await.is_err()
                        || upstream.write_all(&buffered).await.is_err()
                    {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        Ok(addr)
    }

    fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

#[tokio::test]
async fn https_proxy_carries_the_token_endpoint_and_the_upstream_and_no_proxy_bypasses_it()
-> TestResult {
    let pki = Pki::new()?;
    let ca = pki.write_ca()?;
    let token = FakeTokenEndpoint::start().await;
    let token_tls = tls_front(&pki, token.addr).await?;
    let upstream = FakeUpstream::start().await;
    let upstream_tls = tls_front(&pki, upstream.addr).await?;
    let fake_proxy = FakeProxy::default();
    let proxy_addr = fake_proxy.start().await?;

    let token_url = format!(
        "https://localhost:{}/test-tenant/oauth2/v2.0/token",
        token_tls.port()
    );
    let upstream_url = format!("https://localhost:{}", upstream_tls.port());
    let https_proxy = format!("http://proxyuser:proxy-pa55@{proxy_addr}");
    let ca = ca.to_str().unwrap_or_default();

    // Through the proxy.
    let through = [
        ("API_TOKEN_URL", token_url.as_str()),
        ("BEARER_PROXY_TLS_CA_FILE", ca),
        ("HTTPS_PROXY", https_proxy.as_str()),
    ];
    let proxy = start_proxy(&token, &upstream_url, &through).await;
    let response = http1().get(proxy.url("/via-proxy")).send().await?;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let tunnels = fake_proxy.tunnels();
    let targets: Vec<&str> = tunnels.iter().map(|(t, _)| t.as_str()).collect();
    assert!(
        targets.contains(&format!("localhost:{}", token_tls.port()).as_str()),
        "{targets:?}"
    );
    assert!(
        targets.contains(&format!("localhost:{}", upstream_tls.port()).as_str()),
        "{targets:?}"
    );
    // "proxyuser:proxy-pa55" in Base64.
    assert!(
        tunnels
            .iter()
            .all(|(_, auth)| auth.as_deref() == Some("Basic cHJveHl1c2VyOnByb3h5LXBhNTU=")),
        "{tunnels:?}"
    );
    assert_eq!(
        upstream.last().header("authorization"),
        Some("Bearer token-1")
    );

    // NO_PROXY covering both: direct.
    let before = fake_proxy.tunnels().len();
    let direct = [
        ("API_TOKEN_URL", token_url.as_str()),
        ("BEARER_PROXY_TLS_CA_FILE", ca),
        ("HTTPS_PROXY", https_proxy.as_str()),
        ("NO_PROXY", "example.com, localhost"),
    ];
    let proxy = start_proxy(&token, &upstream_url, &direct).await;
    let response = http1().get(proxy.url("/direct")).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        fake_proxy.tunnels().len(),
        before,
        "NO_PROXY: no tunnel opened"
    );
    Ok(())
}

#[tokio::test]
async fn http_proxy_and_a_cidr_no_proxy_for_plain_http() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::start().await;
    let fake_proxy = FakeProxy::default();
    let proxy_addr = fake_proxy.start().await?;
    let http_proxy = format!("http://{proxy_addr}");

    let proxy = start_proxy(
        &token,
        &upstream.url(),
        &[("HTTP_PROXY", http_proxy.as_str())],
    )
    .await;
    let response = http1().get(proxy.url("/x")).send().await?;
    let status = response.status();
    assert_eq!(status, 200, "{}", response.text().await?);
    let targets: Vec<String> = fake_proxy.tunnels().into_iter().map(|(t, _)| t).collect();
    assert!(
        targets.contains(&token.addr.to_string()) && targets.contains(&upstream.addr.to_string()),
        "{targets:?}"
    );

    let before = fake_proxy.tunnels().len();
    let proxy = start_proxy(
        &token,
        &upstream.url(),
        &[
            ("http_proxy", http_proxy.as_str()),
            ("no_proxy", "127.0.0.0/8"),
        ],
    )
    .await;
    assert_eq!(http1().get(proxy.url("/y")).send().await?.status(), 200);
    assert_eq!(
        fake_proxy.tunnels().len(),
        before,
        "127.0.0.0/8 in no_proxy covers 127.0.0.1"
    );
    Ok(())
}

#[tokio::test]
async fn a_token_endpoint_behind_the_private_ca_needs_tls_ca_file() -> TestResult {
    let pki = Pki::new()?;
    let token = FakeTokenEndpoint::start().await;
    let token_tls = tls_front(&pki, token.addr).await?;
    let upstream = FakeUpstream::start().await;
    let token_url = format!(
        "https://localhost:{}/test-tenant/oauth2/v2.0/token",
        token_tls.port()
    );
    let wait = ("BEARER_PROXY_TOKEN_STARTUP_WAIT", "0s");

    let proxy = start_proxy(
        &token,
        &upstream.url(),
        &[("API_TOKEN_URL", token_url.as_str()), wait],
    )
    .await;
    let admin = proxy.admin_url("/status");
    let mut last_error = serde_json::Value::Null;
    for _ in 0..300 {
        let status: serde_json::Value = http1().get(&admin).send().await?.json().await?;
        last_error = status["token"]["last_error"].clone();
        if !last_error.is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let message = last_error["message"].as_str().unwrap_or_default();
    assert_eq!(last_error["code"], "connect_failed");
    assert!(
        message.contains("unknown issuer") && message.contains("tls.ca_file"),
        "{message}"
    );
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_eq!(
        response.headers()["x-bearer-proxy-error"],
        "token_unavailable"
    );

    let ca = pki.write_ca()?;
    let trusted = [
        ("API_TOKEN_URL", token_url.as_str()),
        ("BEARER_PROXY_TLS_CA_FILE", ca.to_str().unwrap_or_default()),
    ];
    let proxy = start_proxy(&token, &upstream.url(), &trusted).await;
    wait_ready(&proxy).await;
    assert_eq!(http1().get(proxy.url("/x")).send().await?.status(), 200);
    Ok(())
}

#[tokio::test]
async fn proxy_credentials_never_show_in_errors_or_status() -> TestResult {
    let (_held, closed) = closed_port()?;
    let https_proxy = format!("http://proxyuser:proxy-pa55@{closed}");
    let token = FakeTokenEndpoint::start().await;
    let token_url = format!(
        "https://localhost:{}/test-tenant/oauth2/v2.0/token",
        token.addr.port()
    );
    let upstream = "https://localhost:9/";
    let settings = [
        ("API_TOKEN_URL", token_url.as_str()),
        ("HTTPS_PROXY", https_proxy.as_str()),
        ("BEARER_PROXY_TOKEN_STARTUP_WAIT", "0s"),
    ];
    let proxy = start_proxy(&token, upstream, &settings).await;
    let admin = proxy.admin_url("/status");
    let mut status = serde_json::Value::Null;
    for _ in 0..300 {
        status = http1().get(&admin).send().await?.json().await?;
        if !status["token"]["last_error"].is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let text = status.to_string();
    assert!(!status["token"]["last_error"].is_null(), "{text}");
    assert!(
        !text.contains("proxy-pa55") && !text.contains("proxyuser"),
        "{text}"
    );
    let body = http1().get(proxy.url("/x")).send().await?.text().await?;
    assert!(!body.contains("proxy-pa55"), "{body}");

    // The token endpoint direct (plain http is not covered by HTTPS_PROXY),
    // the upstream through the dead proxy: the 502 names the proxy without
    // its credentials.
    let proxy = start_proxy(&token, upstream, &[("HTTPS_PROXY", https_proxy.as_str())]).await;
    wait_ready(&proxy).await;
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_eq!(response.status(), 502);
    let body = response.text().await?;
    assert!(
        body.contains(&format!("through the proxy http://{closed}")),
        "{body}"
    );
    assert!(
        !body.contains("proxy-pa55") && !body.contains("proxyuser"),
        "{body}"
    );
    Ok(())
}
