//! `/metrics` on the admin listener: scraped before and after a known set
//! of requests, the deltas must be exact.

mod support;

use std::collections::BTreeMap;

use support::*;

/// One scrape: each series (`name{labels}`) and its value.
async fn scrape(
    proxy: &Proxy,
) -> Result<BTreeMap<String, f64>, Box<dyn std::error::Error + Send + Sync>> {
    let text = admin_text(
        proxy,
        "/metrics",
        "text/plain; version=0.0.4; charset=utf-8",
    )
    .await?;
    let mut series = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .ok_or(format!("a line without a value: {line}"))?;
        series.insert(name.to_owned(), value.parse::<f64>()?);
    }
    Ok(series)
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn requests_replays_refusals_and_timeouts_are_counted_exactly() -> TestResult {
    let upstream = FakeUpstream::with(|seen| match seen.target_str().as_str() {
        "/replay" if seen.bearer() == "token-1" => Reply::status(401),
        "/hang" => Reply::with_body(Body::Hang),
        _ => Reply::ok("ok"),
    })
    .await;
    // No warm connection: one opened by the once-a-second check could land
    // between the hung connection's end and the scrape that counts none.
    let (token, proxy) = ready_proxy_to(
        &upstream.url(),
        &[
            ("BEARER_PROXY_UPSTREAM_RESPONSE_TIMEOUT", "300ms"),
            ("BEARER_PROXY_UPSTREAM_KEEP_WARM", "false"),
        ],
    )
    .await;
    let before = scrape(&proxy).await?;
    let client = http1();
    let mut received = 0;
    for _ in 0..3 {
        let response = client.get(proxy.url("/ok")).send().await?;
        assert_eq!(response.status(), 200);
        received += response.bytes().await?.len();
    }
    let response = client.post(proxy.url("/ok")).body("hello").send().await?;
    assert_eq!(response.status(), 200);
    received += response.bytes().await?.len();
    let response = client.get(proxy.url("/replay")).send().await?;
    assert_eq!(response.status(), 200);
    received += response.bytes().await?.len();
    let response = client
        .get(proxy.url("/refused"))
        .header("host", "evil.example")
        .send()
        .await?;
    assert_proxy_error(&response, 403, "host_not_allowed");
    received += response.bytes().await?.len();
    let response = client.get(proxy.url("/hang")).send().await?;
    assert_proxy_error(&response, 504, "upstream_timeout");
    received += response.bytes().await?.len();

    let mut after = scrape(&proxy).await?;
    for _ in 0..100 {
        if after.get("bearer_proxy_requests_in_flight") == Some(&0.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        after = scrape(&proxy).await?;
    }
    for (series, expected) in [
        (
            "bearer_proxy_requests_total{method=\"GET\",status_class=\"2xx\",code=\"\"}",
            4.0,
        ),
        (
            "bearer_proxy_requests_total{method=\"POST\",status_class=\"2xx\",code=\"\"}",
            1.0,
        ),
        (
            "bearer_proxy_requests_total{method=\"GET\",status_class=\"4xx\",code=\"host_not_allowed\"}",
            1.0,
        ),
        (
            "bearer_proxy_requests_total{method=\"GET\",status_class=\"5xx\",code=\"upstream_timeout\"}",
            1.0,
        ),
        ("bearer_proxy_request_duration_seconds_count", 7.0),
        ("bearer_proxy_upstream_duration_seconds_count", 5.0),
        ("bearer_proxy_replays_total{result=\"accepted\"}", 1.0),
        ("bearer_proxy_replays_total{result=\"refused_again\"}", 0.0),
        ("bearer_proxy_token_forced_renewals_total", 1.0),
        (
            "bearer_proxy_token_requests_total{outcome=\"obtained\",error=\"\",provider_code=\"\"}",
            1.0,
        ),
        (
            "bearer_proxy_upstream_failures_total{kind=\"timeout\"}",
            1.0,
        ),
        (
            "bearer_proxy_upstream_failures_total{kind=\"connect\"}",
            0.0,
        ),
        ("bearer_proxy_received_bytes_total", 5.0),
        ("bearer_proxy_sent_bytes_total", received as f64),
    ] {
        assert_eq!(delta(&before, &after, series), expected, "{series}");
    }
    assert_eq!(after["bearer_proxy_requests_in_flight"], 0.0);
    assert_eq!(after["bearer_proxy_ready"], 1.0);
    assert_eq!(after["bearer_proxy_token_consecutive_failures"], 0.0);
    assert_eq!(token.count(), 2);
    assert!(after["bearer_proxy_client_connections"] >= 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let expiry = after["bearer_proxy_token_expiry_timestamp_seconds"];
    assert!(
        (now + 3500.0..now + 3600.0).contains(&expiry),
        "{expiry} vs {now}"
    );
    let obtained = after["bearer_proxy_token_obtained_timestamp_seconds"];
    assert!(
        (now - 60.0..=now + 1.0).contains(&obtained),
        "{obtained} vs {now}"
    );
    assert_eq!(
        after[&format!(
            "bearer_proxy_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )],
        1.0
    );
    // The connection that hung was closed; a new request opens one, which
    // stays in the pool.
    assert_eq!(
        after["bearer_proxy_upstream_connections{protocol=\"http/1.1\"}"],
        0.0
    );
    assert_eq!(client.get(proxy.url("/ok")).send().await?.status(), 200);
    let pooled = scrape(&proxy).await?;
    assert_eq!(
        pooled["bearer_proxy_upstream_connections{protocol=\"http/1.1\"}"],
        1.0
    );
    assert_eq!(
        pooled["bearer_proxy_upstream_connections{protocol=\"h2\"}"],
        0.0
    );
    // The 300 ms timeout lands in its bucket, the rest well below.
    assert!(
        delta(
            &before,
            &after,
            "bearer_proxy_request_duration_seconds_bucket{le=\"0.25\"}"
        ) >= 6.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "bearer_proxy_request_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        7.0
    );
    Ok(())
}

#[tokio::test]
async fn rejected_credentials_and_an_unreachable_upstream_are_counted() -> TestResult {
    // The provider rejects the secret: no token, 503 for every request.
    let token = FakeTokenEndpoint::start().await;
    token.script([TokenReply::invalid_secret()]);
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(
        &token,
        &upstream.url(),
        &[("BEARER_PROXY_TOKEN_STARTUP_WAIT", "1ms")],
    )
    .await;
    support::until(|| token.count() >= 1, "a token request").await?;
    let response = http1().delete(proxy.url("/x")).send().await?;
    assert_proxy_error(&response, 503, "token_unavailable");
    let metrics = scrape(&proxy).await?;
    for (series, expected) in [
        (
            "bearer_proxy_token_requests_total{outcome=\"rejected\",error=\"invalid_client\",provider_code=\"AADSTS7000215\"}",
            1.0,
        ),
        (
            "bearer_proxy_token_requests_total{outcome=\"obtained\",error=\"\",provider_code=\"\"}",
            0.0,
        ),
        ("bearer_proxy_token_consecutive_failures", 1.0),
        ("bearer_proxy_token_expiry_timestamp_seconds", 0.0),
        ("bearer_proxy_ready", 0.0),
        (
            "bearer_proxy_requests_total{method=\"DELETE\",status_class=\"5xx\",code=\"token_unavailable\"}",
            1.0,
        ),
    ] {
        assert_eq!(metrics.get(series).copied(), Some(expected), "{series}");
    }

    // An upstream that refuses connections.
    let (_held, closed) = closed_port()?;
    let (_token, proxy) = ready_proxy_to(&format!("http://{closed}"), &[]).await;
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_proxy_error(&response, 502, "upstream_unreachable");
    let metrics = scrape(&proxy).await?;
    assert_eq!(
        metrics.get("bearer_proxy_upstream_failures_total{kind=\"connect\"}"),
        Some(&1.0)
    );
    assert_eq!(
        metrics.get("bearer_proxy_requests_total{method=\"GET\",status_class=\"5xx\",code=\"upstream_unreachable\"}"),
        Some(&1.0)
    );
    Ok(())
}

/// Runs `promtool` (Debian's `prometheus`) with `args` and `input` on
/// stdin; `None` (skipped, with a notice) where it is not installed and
/// `CI` is not set.
fn promtool(
    args: &[&str],
    input: &str,
) -> Result<Option<String>, Box<dyn std::error::Error + Send + Sync>> {
    use std::io::Write as _;
    let spawned = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(_) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: promtool is not installed (apt install prometheus)");
            return Ok(None);
        }
        Err(e) => {
            return Err(format!("promtool: {e}; .ci/run installs it (apt prometheus)").into());
        }
    };
    child
        .stdin
        .take()
        .ok_or("stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    Ok(Some(text))
}

#[tokio::test]
async fn the_scrape_passes_promtool_and_has_every_name_the_dashboard_and_rules_use() -> TestResult {
    let (_token, _upstream, proxy) = ready_proxy(&[]).await;
    // Some of everything: an answer, and a refusal.
    http1().get(proxy.url("/x")).send().await?.bytes().await?;
    let text = admin_text(
        &proxy,
        "/metrics",
        "text/plain; version=0.0.4; charset=utf-8",
    )
    .await?;
    if let Some(report) = promtool(&["check", "metrics"], &text)? {
        assert!(report.trim().is_empty(), "promtool's lint:\n{report}");
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = root.join("examples/prometheus/alerts.yaml");
    promtool(&["check", "rules", rules.to_str().ok_or("path")?], "")?;

    // Every family, and the series names a histogram has.
    let mut exported = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split(' ');
            let (name, kind) = (words.next().ok_or("name")?, words.next().ok_or("kind")?);
            exported.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    for file in [
        "examples/prometheus/alerts.yaml",
        "examples/grafana/bearer-proxy.json",
    ] {
        let source = std::fs::read_to_string(root.join(file))?;
        let mut used = 0;
        for (at, _) in source.match_indices("bearer_proxy_") {
            let name: String = source[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                exported.contains(&name),
                "{file} uses {name}, which /metrics does not export"
            );
            used += 1;
        }
        assert!(used >= 5, "{file} uses {used} names");
    }
    Ok(())
}

#[tokio::test]
async fn a_client_that_leaves_before_its_answer_is_counted_as_client_closed() -> TestResult {
    let upstream = FakeUpstream::with(|_| Reply::with_body(Body::Hang)).await;
    let (_token, proxy) = ready_proxy_to(&upstream.url(), &[]).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_millis(200))
        .build()?;
    assert!(client.get(proxy.url("/slow")).send().await.is_err());
    let series =
        "bearer_proxy_requests_total{method=\"GET\",status_class=\"4xx\",code=\"client_closed\"}";
    let mut metrics = scrape(&proxy).await?;
    for _ in 0..200 {
        if metrics.get(series) == Some(&1.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        metrics = scrape(&proxy).await?;
    }
    assert_eq!(metrics.get(series), Some(&1.0), "{metrics:?}");
    assert_eq!(metrics["bearer_proxy_requests_in_flight"], 0.0);
    assert!(
        !metrics.keys().any(|k| k.contains("status_class=\"1xx\"")),
        "{metrics:?}"
    );
    Ok(())
}
