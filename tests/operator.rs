//! Operator entry points: `check` and `healthcheck`, as the binary runs them.

mod support;

use std::time::Duration;

use support::*;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_bearer-proxy");

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn bin(args: &[&str], env: &[(&str, &str)]) -> std::io::Result<Outcome> {
    let output = Command::new(BIN)
        .env_clear()
        .args(args)
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output()
        .await?;
    Ok(Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

fn check_env<'a>(token_url: &'a str, upstream: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("API_CLIENT_ID", CLIENT_ID),
        ("API_CLIENT_SECRET", CLIENT_SECRET),
        ("API_TOKEN_URL", token_url),
        ("BEARER_PROXY_UPSTREAM", upstream),
        ("BEARER_PROXY_UPSTREAM_CONNECT_TIMEOUT", "2s"),
        ("BEARER_PROXY_TOKEN_TIMEOUT", "2s"),
    ]
}

fn status_upstream_body(request: &Recorded) -> Reply {
    let bearer = request.bearer();
    let body = serde_json::json!({
        "status": "up",
        "token": bearer,
        "audience": "api://test-upstream",
        "clientId": CLIENT_ID,
    });
    Reply {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Body::Bytes(body.to_string().into_bytes()),
    }
}

fn assert_no_secrets(out: &Outcome) {
    for text in [&out.stdout, &out.stderr] {
        assert!(
            !text.contains(CLIENT_SECRET),
            "the secret was printed:\n{text}"
        );
        assert!(!text.contains("token-1"), "the token was printed:\n{text}");
    }
}

#[tokio::test]
async fn check_reports_a_working_setup() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::with(status_upstream_body).await;
    let (token_url, upstream_url) = (token.url(), format!("{}/base", upstream.url()));
    let out = bin(&["check"], &check_env(&token_url, &upstream_url)).await?;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains(&token_url), "{}", out.stdout);
    assert!(out.stdout.contains("lifetime 3599 s"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&format!("GET {upstream_url}/api/status")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("HTTP 200 OK"), "{}", out.stdout);
    assert!(out.stdout.contains("system certificates"), "{}", out.stdout);
    assert!(
        out.stdout.contains("upstream route  direct"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("protocol        HTTP/1.1"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("\"token\":\"[masked]\""),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .trim_end()
            .ends_with("OK: the credentials work and the upstream answers."),
        "{}",
        out.stdout
    );
    assert_no_secrets(&out);
    let seen = upstream.last();
    assert_eq!(seen.target_str(), "/base/api/status");
    assert_eq!(seen.header("authorization"), Some("Bearer token-1"));
    assert_eq!(
        seen.header("user-agent"),
        Some(concat!("bearer-proxy/", env!("CARGO_PKG_VERSION")))
    );
    Ok(())
}

#[tokio::test]
async fn check_explains_a_rejected_secret() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    token.script([TokenReply::invalid_secret()]);
    let upstream = FakeUpstream::start().await;
    let (token_url, upstream_url) = (token.url(), upstream.url());
    let out = bin(&["check"], &check_env(&token_url, &upstream_url)).await?;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert!(out.stdout.contains("FAILED: the token endpoint rejected the request (HTTP 401 invalid_client, AADSTS7000215)"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("The client secret is wrong: copy the secret's value, not its id."),
        "{}",
        out.stdout
    );
    assert!(
        upstream.requests().is_empty(),
        "no upstream call without a token"
    );
    assert_no_secrets(&out);
    Ok(())
}

#[tokio::test]
async fn check_explains_an_unreachable_provider_and_upstream_refusals() -> TestResult {
    let (_held, closed) = closed_port()?;
    let dead_token_url = format!("http://{closed}/tenant/oauth2/v2.0/token");
    let upstream = FakeUpstream::start().await;
    let upstream_url = upstream.url();
    let out = bin(&["check"], &check_env(&dead_token_url, &upstream_url)).await?;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stdout
            .contains("FAILED: cannot reach the token endpoint"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("Check the token endpoint URL"),
        "{}",
        out.stdout
    );
    assert_no_secrets(&out);

    let token = FakeTokenEndpoint::start().await;
    let refusing = FakeUpstream::with(|_| {
        Reply::status(401).header("www-authenticate", "Bearer error=\"invalid_token\"")
    })
    .await;
    let (token_url, refusing_url) = (token.url(), refusing.url());
    let out = bin(&["check"], &check_env(&token_url, &refusing_url)).await?;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stdout
            .contains("FAILED: the status call answered HTTP 401 Unauthorized"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("API_SCOPE"), "{}", out.stdout);
    assert_no_secrets(&out);

    let out = bin(
        &["check"],
        &check_env(&token_url, &format!("http://{closed}")),
    )
    .await?;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stdout.contains("cannot connect to the upstream") && out.stdout.contains("refused"),
        "{}",
        out.stdout
    );
    Ok(())
}

#[tokio::test]
async fn check_reports_configuration_errors_with_exit_64() -> TestResult {
    let out = bin(&["check"], &[("API_CLIENT_SECRET", "x")]).await?;
    assert_eq!(out.code, Some(64));
    assert!(out.stderr.contains("API_CLIENT_ID"), "{}", out.stderr);
    Ok(())
}

#[tokio::test]
async fn healthcheck_follows_the_admin_listener() -> TestResult {
    let upstream = FakeUpstream::start().await;
    let (_token, proxy) = proxy_to(&upstream.url(), &[]).await;
    let admin = proxy.admin.to_string();
    // Only the admin address is needed: no credentials in this environment.
    let out = bin(&["healthcheck", "--admin-listen", &admin], &[]).await?;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let wildcard = format!("0.0.0.0:{}", proxy.admin.port());
    let out = bin(
        &["healthcheck"],
        &[("BEARER_PROXY_ADMIN_LISTEN", &wildcard)],
    )
    .await?;
    assert_eq!(
        out.code,
        Some(0),
        "a wildcard address is probed on loopback: {}",
        out.stderr
    );

    proxy.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), proxy.task).await???;
    let out = bin(&["healthcheck", "--admin-listen", &admin], &[]).await?;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("/healthz") && out.stderr.contains("connect"),
        "{}",
        out.stderr
    );

    // Something that is not the admin listener answers 404: not healthy.
    let other = FakeUpstream::with(|_| Reply::status(404)).await;
    let out = bin(
        &["healthcheck", "--admin-listen", &other.addr.to_string()],
        &[],
    )
    .await?;
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("HTTP 404"), "{}", out.stderr);
    Ok(())
}

#[tokio::test]
async fn check_json_gives_the_same_report_to_scripts() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::with(status_upstream_body).await;
    let (token_url, upstream_url) = (token.url(), format!("{}/base", upstream.url()));
    let out = bin(&["check", "--json"], &check_env(&token_url, &upstream_url)).await?;
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_no_secrets(&out);
    let report: serde_json::Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(report["ok"], true);
    assert!(report["failure"].is_null(), "{report}");
    let findings = &report["findings"];
    assert_eq!(findings["token_endpoint"], token_url.as_str());
    assert_eq!(findings["client_id"], CLIENT_ID);
    assert_eq!(findings["protocol"], "HTTP/1.1");
    assert_eq!(
        findings["status"]
            .as_str()
            .map(|s| s.starts_with("HTTP 200 OK")),
        Some(true)
    );
    assert_eq!(
        findings["status_call"],
        format!("GET {upstream_url}/api/status").as_str()
    );
    assert!(
        findings["body"]
            .as_str()
            .is_some_and(|b| b.contains("[masked]")),
        "{report}"
    );

    // A rejected secret: the failing step, what went wrong, what to do.
    token.script([TokenReply::invalid_secret()]);
    let out = bin(&["check", "--json"], &check_env(&token_url, &upstream_url)).await?;
    assert_eq!(out.code, Some(1));
    assert_no_secrets(&out);
    let report: serde_json::Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(report["ok"], false);
    assert!(report["findings"].get("token").is_none(), "{report}");
    assert_eq!(report["findings"]["token_endpoint"], token_url.as_str());
    assert_eq!(report["failure"]["step"], "token");
    assert_text_contains(&report["failure"], "what", "AADSTS7000215");
    assert_text_contains(&report["failure"], "hint", "value, not its id");
    Ok(())
}
