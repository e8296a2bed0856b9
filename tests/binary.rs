//! The `bearer-proxy` binary as a user runs it: configuration errors and
//! their exit code, logs without secrets, signals, and memory under large
//! transfers.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bearer_proxy::config::{Config, Flags};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_bearer-proxy");

fn command(env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .args(args)
        .envs(env.iter().copied())
        .kill_on_drop(true);
    command
}

async fn config_error(
    env: &[(&str, &str)],
    args: &[&str],
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    // A value taken as valid would start the proxy, which runs until it
    // is stopped: that is a failure here, not a hang (killed on drop).
    let output = tokio::time::timeout(Duration::from_secs(30), command(env, args).output())
        .await
        .map_err(|_| format!("not refused: still running after 30 s with {env:?} {args:?}"))??;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(64), "stderr: {stderr}");
    assert!(
        stderr.starts_with("bearer-proxy: invalid configuration: "),
        "{stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one message: {stderr}"
    );
    Ok(stderr)
}

fn temp_file(name: &str, content: &str) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bearer-proxy-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, content)?;
    Ok(path)
}

const CREDENTIALS: [(&str, &str); 2] = [
    ("API_CLIENT_ID", CLIENT_ID),
    ("API_CLIENT_SECRET", CLIENT_SECRET),
];

#[tokio::test]
async fn configuration_errors_exit_64_naming_the_key() -> TestResult {
    let e = config_error(&[("API_CLIENT_SECRET", "x")], &[]).await?;
    assert!(e.contains("API_CLIENT_ID is not set"), "{e}");

    let e = config_error(&[("API_CLIENT_ID", "x")], &[]).await?;
    assert!(
        e.contains("API_CLIENT_SECRET") && e.contains("API_CLIENT_SECRET_FILE"),
        "{e}"
    );

    let secret_file = temp_file("secret", "s\n")?;
    let both = [
        CREDENTIALS[0],
        CREDENTIALS[1],
        (
            "API_CLIENT_SECRET_FILE",
            secret_file.to_str().unwrap_or_default(),
        ),
    ];
    let e = config_error(&both, &[]).await?;
    assert!(e.contains("both set"), "{e}");

    let unknown = temp_file("unknown.toml", "[upstream]\nurll = \"https://x\"\n")?;
    let e = config_error(
        &CREDENTIALS,
        &["--config", unknown.to_str().unwrap_or_default()],
    )
    .await?;
    assert!(
        e.contains("unknown key `upstream.urll`") && e.contains("upstream.url"),
        "{e}"
    );

    let e = config_error(&CREDENTIALS, &["run", "--upstream", "not a url"]).await?;
    assert!(
        e.contains("upstream.url (set by --upstream)") && e.contains("http:// or https://"),
        "{e}"
    );

    let e = config_error(
        &[
            CREDENTIALS[0],
            CREDENTIALS[1],
            ("BEARER_PROXY_LISTEN", "8080"),
        ],
        &[],
    )
    .await?;
    assert!(
        e.contains("listen (set by BEARER_PROXY_LISTEN)") && e.contains("host:port"),
        "{e}"
    );

    let e = config_error(
        &[
            CREDENTIALS[0],
            CREDENTIALS[1],
            ("BEARER_PROXY_UPSTREAM_HTTP2", "maybe"),
        ],
        &[],
    )
    .await?;
    assert!(
        e.contains("upstream.http2 (set by BEARER_PROXY_UPSTREAM_HTTP2)")
            && e.contains("true or false"),
        "{e}"
    );

    let duration = temp_file("duration.toml", "[token]\ntimeout = \"30 parsecs\"\n")?;
    let env = [
        CREDENTIALS[0],
        CREDENTIALS[1],
        ("BEARER_PROXY_CONFIG", duration.to_str().unwrap_or_default()),
    ];
    let e = config_error(&env, &[]).await?;
    assert!(
        e.contains("token.timeout (in ") && e.contains("duration"),
        "{e}"
    );

    let number = temp_file("number.toml", "[token]\ntimeout = 30\n")?;
    let e = config_error(
        &CREDENTIALS,
        &["--config", number.to_str().unwrap_or_default()],
    )
    .await?;
    assert!(e.contains("`token.timeout` must be a string"), "{e}");

    let e = config_error(
        &CREDENTIALS,
        &["--config", "/nonexistent/bearer-proxy.toml"],
    )
    .await?;
    assert!(
        e.contains("/nonexistent/bearer-proxy.toml") && e.contains("cannot read"),
        "{e}"
    );

    let output = command(&CREDENTIALS, &["--no-such-flag"]).output().await?;
    assert_eq!(output.status.code(), Some(2));
    Ok(())
}

#[test]
fn the_sample_config_file_loads_and_lists_every_key() -> TestResult {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/bearer-proxy.toml");
    let flags = Flags {
        config: Some(path.clone()),
        ..Flags::default()
    };
    let from_file = Config::load(&flags, &CREDENTIALS[..])?;
    let defaults = Config::load(&Flags::default(), &CREDENTIALS[..])?;
    assert_eq!(
        format!("{from_file:?}"),
        format!("{defaults:?}"),
        "the file shows the defaults"
    );

    let text = std::fs::read_to_string(&path)?;
    let mut section = String::new();
    let mut mentioned = Vec::new();
    for line in text.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, _)) = line.split_once(" = ") {
            mentioned.push(if section.is_empty() {
                key.to_owned()
            } else {
                format!("{section}.{key}")
            });
        }
    }
    for key in bearer_proxy::config::known_keys() {
        assert!(
            mentioned.iter().any(|m| m == key),
            "config/bearer-proxy.toml does not list {key}"
        );
    }
    Ok(())
}

/// The binary, running, with its stderr lines arriving on a channel.
struct Running {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Running {
    /// The binary pointed at the fakes, listening on port 0, logging JSON.
    fn against(
        token: &FakeTokenEndpoint,
        upstream: &FakeUpstream,
        extra: &[(&str, &str)],
    ) -> std::io::Result<Self> {
        let (token_url, upstream_url) = (token.url(), upstream.url());
        let mut env = vec![
            CREDENTIALS[0],
            CREDENTIALS[1],
            ("API_TOKEN_URL", token_url.as_str()),
            ("BEARER_PROXY_UPSTREAM", upstream_url.as_str()),
            ("BEARER_PROXY_LISTEN", "127.0.0.1:0"),
            ("BEARER_PROXY_ADMIN_LISTEN", "127.0.0.1:0"),
            ("BEARER_PROXY_LOG_FORMAT", "json"),
        ];
        env.extend_from_slice(extra);
        Self::start(&env)
    }

    fn start(env: &[(&str, &str)]) -> std::io::Result<Self> {
        let mut child = command(env, &[])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| std::io::Error::other("no stderr"))?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = tx.send(line);
            }
        });
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    /// Waits for a JSON log line whose message contains `text`.
    async fn wait_for(
        &mut self,
        text: &str,
    ) -> Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>> {
        let matches = |line: &str| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .filter(|value| value["message"].as_str().is_some_and(|m| m.contains(text)))
        };
        if let Some(found) = self.seen.iter().find_map(|line| matches(line)) {
            return Ok(found);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .map_err(|_| format!("no log line with {text:?}; saw:\n{}", self.seen.join("\n")))?
                .ok_or_else(|| format!("stderr closed; saw:\n{}", self.seen.join("\n")))?;
            self.seen.push(line.clone());
            if let Some(found) = matches(&line) {
                return Ok(found);
            }
        }
    }

    async fn terminate(
        mut self,
    ) -> Result<(Option<i32>, String), Box<dyn std::error::Error + Send + Sync>> {
        let pid = self.child.id().ok_or("no pid")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await??;
        while let Some(line) = self.lines.recv().await {
            self.seen.push(line);
        }
        Ok((status.code(), self.seen.join("\n")))
    }
}

fn address(
    line: &serde_json::Value,
    field: &str,
) -> Result<std::net::SocketAddr, Box<dyn std::error::Error + Send + Sync>> {
    Ok(line[field].as_str().ok_or("address field")?.parse()?)
}

#[tokio::test]
async fn a_rejected_secret_is_logged_with_its_code_and_never_the_secret() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    token.script([TokenReply::invalid_secret()]);
    let upstream = FakeUpstream::start().await;
    let mut running = Running::against(
        &token,
        &upstream,
        &[
            ("BEARER_PROXY_TOKEN_STARTUP_WAIT", "100ms"),
            ("RUST_LOG", "trace"),
        ],
    )?;
    let ready = running.wait_for("listening").await?;
    let error = running.wait_for("token request failed").await?;
    assert_eq!(error["level"], "ERROR");
    assert_eq!(error["provider_code"], "AADSTS7000215");
    assert_eq!(error["code"], "invalid_client");
    assert_text_contains(&error, "hint", "value, not its id");

    let proxy = address(&ready, "listen")?;
    let response = http1().get(format!("http://{proxy}/x")).send().await?;
    assert_eq!(response.status(), 503);
    let body = response.text().await?;
    assert!(
        body.contains("AADSTS7000215") && !body.contains(CLIENT_SECRET),
        "{body}"
    );

    let (code, logs) = running.terminate().await?;
    assert_eq!(code, Some(0), "SIGTERM ends the process normally:\n{logs}");
    assert!(
        !logs.contains(CLIENT_SECRET),
        "the secret appears in the logs at trace level"
    );
    let encoded: String = form_urlencoded::byte_serialize(CLIENT_SECRET.as_bytes()).collect();
    assert!(
        !logs.contains(&encoded),
        "the encoded secret appears in the logs"
    );
    Ok(())
}

#[tokio::test]
async fn secrets_never_appear_in_logs_at_trace_level() -> TestResult {
    // A rejected token request, then tokens; an upstream that refuses the
    // first token, so a 401 replay happens too.
    let token = FakeTokenEndpoint::start().await;
    token.script([TokenReply::invalid_secret()]);
    let upstream = FakeUpstream::with(|request| {
        if request.header("authorization") == Some("Bearer token-1") {
            Reply::status(401)
        } else {
            Reply::ok("ok")
        }
    })
    .await;
    let extra = [
        ("RUST_LOG", "trace"),
        ("BEARER_PROXY_TOKEN_RETRY_INITIAL", "100ms"),
        ("BEARER_PROXY_TOKEN_RETRY_MAX", "300ms"),
    ];
    let mut running = Running::against(&token, &upstream, &extra)?;
    let ready = running.wait_for("listening").await?;
    running.wait_for("token request failed").await?;
    running.wait_for("token endpoint recovered").await?;
    let proxy = address(&ready, "listen")?;
    for client in [http1(), h2c()] {
        let response = client
            .post(format!("http://{proxy}/x"))
            .body("data")
            .send()
            .await?;
        assert_eq!(response.status(), 200);
    }
    let tokens: Vec<String> = upstream
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        tokens,
        ["Bearer token-1", "Bearer token-2", "Bearer token-2"],
        "a 401 replay happened"
    );
    let (code, logs) = running.terminate().await?;
    assert_eq!(code, Some(0));
    assert!(
        logs.lines().count() > 50,
        "trace level logged: {} lines",
        logs.lines().count()
    );
    for secret in ["token-1", "token-2", CLIENT_SECRET] {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
    let encoded: String = form_urlencoded::byte_serialize(CLIENT_SECRET.as_bytes()).collect();
    assert!(
        !logs.contains(&encoded),
        "the encoded secret appears in the logs"
    );
    Ok(())
}

#[tokio::test]
async fn a_non_loopback_listen_address_is_warned_about() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::start().await;
    let mut running = Running::against(&token, &upstream, &[("BEARER_PROXY_LISTEN", "0.0.0.0:0")])?;
    let warning = running.wait_for("listening beyond loopback").await?;
    assert_eq!(warning["level"], "WARN");
    let message = warning["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("guard.allowed_hosts") && message.contains("guard.local_key_file"),
        "{message}"
    );
    let (code, _) = running.terminate().await?;
    assert_eq!(code, Some(0));
    Ok(())
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
async fn large_bodies_stream_through_in_bounded_memory() -> TestResult {
    const SIZE: u64 = 256 * 1024 * 1024;
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::with(|request| {
        if request.target_str() == "/download" {
            Reply::with_body(Body::Zeros(SIZE))
        } else {
            Reply::ok("stored")
        }
    })
    .await;
    let mut running = Running::against(&token, &upstream, &[])?;
    let ready = running.wait_for("listening").await?;
    running.wait_for("token obtained").await?;
    let proxy = address(&ready, "listen")?;
    let pid = running.child.id().ok_or("pid")?;
    let baseline = peak_rss_kib(pid).ok_or("VmHWM")?;

    let mut response = http1()
        .get(format!("http://{proxy}/download"))
        .send()
        .await?;
    let mut received = 0u64;
    while let Some(chunk) = response.chunk().await? {
        received += chunk.len() as u64;
    }
    assert_eq!(received, SIZE);

    let (tx, rx) = mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tokio::spawn(async move {
        let piece = vec![7u8; 256 * 1024];
        for _ in 0..SIZE / piece.len() as u64 {
            if tx.send(Ok(piece.clone())).await.is_err() {
                return;
            }
        }
    });
    let body = channel_body(rx);
    let response = http1()
        .put(format!("http://{proxy}/upload"))
        .body(body)
        .send()
        .await?;
    assert_eq!(response.text().await?, "stored");
    assert_eq!(upstream.last().body_len, SIZE);

    let peak = peak_rss_kib(pid).ok_or("VmHWM")?;
    eprintln!("peak RSS {peak} KiB, baseline {baseline} KiB");
    let (code, _) = running.terminate().await?;
    assert_eq!(code, Some(0));
    // 512 MiB went through; the proxy's peak grew by a few MiB at most.
    assert!(
        peak < 48 * 1024,
        "peak RSS {peak} KiB (baseline {baseline} KiB)"
    );
    assert!(
        peak - baseline < 24 * 1024,
        "peak RSS grew from {baseline} KiB to {peak} KiB"
    );
    Ok(())
}

/// Every stderr line of a JSON-logging run is a JSON object; those of the
/// access log carry each request's fields.
#[tokio::test]
async fn every_request_gets_an_access_log_line() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::start().await;
    let mut running = Running::against(&token, &upstream, &[])?;
    let ready = running.wait_for("listening").await?;
    let proxy = address(&ready, "listen")?;
    let client = http1();
    let response = client
        .get(format!("http://{proxy}/orders/7?api_key=hidden"))
        .send()
        .await?;
    assert_eq!(response.text().await?, "ok");
    let response = client
        .post(format!("http://{proxy}/orders"))
        .body("hello")
        .send()
        .await?;
    assert_eq!(response.text().await?, "ok");
    let response = client
        .get(format!("http://{proxy}/refused"))
        .header("host", "evil.example")
        .send()
        .await?;
    let refusal = response.bytes().await?.len();
    let (code, logs) = running.terminate().await?;
    assert_eq!(code, Some(0));
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("a line that is not JSON ({e}):\n{logs}"))?;
    let access: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["target"] == "access").collect();
    assert_eq!(access.len(), 3, "{logs}");
    let get = access[0];
    assert_eq!(get["level"], "INFO");
    assert_eq!(get["method"], "GET");
    assert_eq!(get["path"], "/orders/7");
    assert!(get.get("query").is_none(), "the query is left out: {get}");
    assert!(!logs.contains("hidden"), "the query appears in the log");
    assert_eq!(get["version"], "HTTP/1.1");
    assert_eq!(get["status"], 200);
    assert!(get.get("code").is_none(), "{get}");
    assert_eq!(get["bytes_in"], 0);
    assert_eq!(get["bytes_out"], 2);
    assert_eq!(get["replayed"], false);
    let total = get["duration_ms"].as_f64().ok_or("duration_ms")?;
    let upstream_ms = get["upstream_ms"].as_f64().ok_or("upstream_ms")?;
    assert!(total >= upstream_ms && upstream_ms > 0.0, "{get}");
    let post = access[1];
    assert_eq!(
        (post["method"].as_str(), post["bytes_in"].as_u64()),
        (Some("POST"), Some(5))
    );
    let refused = access[2];
    assert_eq!(refused["status"], 403);
    assert_eq!(refused["code"], "host_not_allowed");
    assert_eq!(refused["bytes_out"], refusal);
    assert!(refused.get("upstream_ms").is_none(), "{refused}");
    Ok(())
}

#[tokio::test]
async fn the_text_access_log_is_one_readable_line_and_can_be_turned_off() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::start().await;
    for (on, query) in [("true", "true"), ("false", "false")] {
        let mut running = Running::against(
            &token,
            &upstream,
            &[
                ("BEARER_PROXY_LOG_ACCESS", on),
                ("BEARER_PROXY_LOG_ACCESS_QUERY", query),
            ],
        )?;
        let ready = running.wait_for("listening").await?;
        let proxy = address(&ready, "listen")?;
        let response = http1()
            .get(format!("http://{proxy}/a/b?x=1"))
            .send()
            .await?;
        assert_eq!(response.status(), 200);
        response.bytes().await?;
        let (_, logs) = running.terminate().await?;
        let access: Vec<serde_json::Value> = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["target"] == "access")
            .collect();
        if on == "false" {
            assert!(access.is_empty(), "{logs}");
        } else {
            assert_eq!(access.len(), 1, "{logs}");
            assert_eq!(access[0]["query"], "x=1");
        }
    }
    // Text: one compact line.
    let mut env = vec![
        CREDENTIALS[0],
        CREDENTIALS[1],
        ("BEARER_PROXY_LISTEN", "127.0.0.1:0"),
        ("BEARER_PROXY_ADMIN_LISTEN", "127.0.0.1:0"),
        ("BEARER_PROXY_LOG_FORMAT", "text"),
    ];
    let (token_url, upstream_url) = (token.url(), upstream.url());
    env.push(("API_TOKEN_URL", token_url.as_str()));
    env.push(("BEARER_PROXY_UPSTREAM", upstream_url.as_str()));
    let mut running = Running::start(&env)?;
    let listening = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), running.lines.recv())
            .await?
            .ok_or("stderr closed")?;
        if line.contains("listening") {
            break line;
        }
    };
    let listen = listening
        .split("listen=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or("listen=")?
        .to_owned();
    let response = http1()
        .get(format!("http://{listen}/a/b?x=1"))
        .send()
        .await?;
    response.bytes().await?;
    let (_, logs) = running.terminate().await?;
    let line = logs
        .lines()
        .find(|l| l.contains(" access: "))
        .ok_or(format!("no access line:\n{logs}"))?;
    assert!(
        line.contains(" INFO access: GET /a/b HTTP/1.1 200 "),
        "{line}"
    );
    assert!(line.contains("in=0 out=2"), "{line}");
    assert!(!line.contains("x=1"), "{line}");
    Ok(())
}

#[tokio::test]
async fn start_up_says_what_it_waits_for() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    token.script([TokenReply::invalid_secret()]);
    let upstream = FakeUpstream::start().await;
    let mut running = Running::against(&token, &upstream, &[])?;
    let waiting = running.wait_for("still waiting for a first token").await?;
    assert_eq!(waiting["level"], "WARN");
    assert_eq!(waiting["code"], "invalid_client");
    assert_eq!(waiting["provider_code"], "AADSTS7000215");
    assert!(
        waiting["waited_s"].as_u64().is_some_and(|s| s >= 5),
        "{waiting}"
    );
    let message = waiting["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&token.url()) && message.contains("AADSTS7000215"),
        "{message}"
    );
    let (_, logs) = running.terminate().await?;
    assert!(!logs.contains(CLIENT_SECRET));
    Ok(())
}

/// One request id, followed from the client to the upstream, to the log
/// and back in the answer; made by the proxy when the client sent none or
/// one that is not sane; in the warning about a failed request too.
#[tokio::test]
async fn a_request_id_goes_from_client_to_upstream_to_log_to_answer() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::with(|seen| match seen.target_str().as_str() {
        "/hang" => Reply::with_body(Body::Hang),
        _ => Reply::ok("ok"),
    })
    .await;
    let mut running = Running::against(
        &token,
        &upstream,
        &[("BEARER_PROXY_UPSTREAM_RESPONSE_TIMEOUT", "300ms")],
    )?;
    let ready = running.wait_for("listening").await?;
    let proxy = address(&ready, "listen")?;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut ids = Vec::new();
    for (via, sent) in [
        ("HTTP/1.1", Some("client-id-1")),
        ("h2c", Some("client-id-2")),
        ("HTTP/1.1", None),
        ("HTTP/1.1", Some("not sane")),
        ("h2c", None),
    ] {
        let client = if via == "h2c" { h2c() } else { http1() };
        let mut request = client
            .post(format!("http://{proxy}/id"))
            .header("traceparent", traceparent)
            .header("tracestate", "vendor=x")
            .body("b");
        if let Some(id) = sent {
            request = request.header("x-request-id", id);
        }
        let response = request.send().await?;
        let returned = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .ok_or("no x-request-id in the answer")?
            .to_owned();
        response.bytes().await?;
        let seen = upstream.last();
        assert_eq!(
            seen.header_all("x-request-id"),
            [returned.as_str()],
            "{via} {sent:?}"
        );
        assert_eq!(seen.header("traceparent"), Some(traceparent));
        assert_eq!(seen.header("tracestate"), Some("vendor=x"));
        match sent {
            Some(id) if !id.contains(' ') => assert_eq!(returned, id),
            _ => assert!(
                returned.len() == 32 && returned.bytes().all(|b| b.is_ascii_hexdigit()),
                "{returned}"
            ),
        }
        ids.push(returned);
    }
    let response = http1().get(format!("http://{proxy}/hang")).send().await?;
    assert_eq!(response.status(), 504);
    let hang_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .ok_or("no x-request-id on the proxy's own answer")?
        .to_owned();
    let warning = running.wait_for("sent no response headers").await?;
    assert_eq!(warning["request_id"], hang_id.as_str());
    assert_eq!(warning["level"], "WARN");
    let (_, logs) = running.terminate().await?;
    let access: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "access")
        .collect();
    assert_eq!(access.len(), ids.len() + 1, "{logs}");
    for (line, id) in access.iter().zip(&ids) {
        assert_eq!(line["request_id"], id.as_str(), "{line}");
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    }
    assert_eq!(access[ids.len()]["request_id"], hang_id.as_str());
    assert_eq!(access[ids.len()]["code"], "upstream_timeout");
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), ids.len(), "ids are not reused: {ids:?}");
    Ok(())
}

/// At debug, what the upstream's client logs while it serves a request
/// carries the request's id (through a span).
#[tokio::test]
async fn debug_lines_about_a_request_carry_its_id() -> TestResult {
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::start().await;
    let (_held, closed) = closed_port()?;
    let closed_url = format!("http://{closed}");
    let mut running = Running::against(
        &token,
        &upstream,
        &[
            ("RUST_LOG", "debug"),
            ("BEARER_PROXY_UPSTREAM", closed_url.as_str()),
            // Only the request's own attempt to connect.
            ("BEARER_PROXY_UPSTREAM_KEEP_WARM", "false"),
        ],
    )?;
    let ready = running.wait_for("listening").await?;
    let proxy = address(&ready, "listen")?;
    let response = http1().get(format!("http://{proxy}/x")).send().await?;
    assert_eq!(response.status(), 502);
    let id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .ok_or("no x-request-id")?
        .to_owned();
    let connecting = running.wait_for(&format!("connecting to {closed}")).await?;
    assert_eq!(connecting["level"], "DEBUG");
    assert_eq!(
        connecting["span"]["request_id"],
        id.as_str(),
        "{connecting}"
    );
    let warning = running.wait_for("cannot connect to the upstream").await?;
    assert_eq!(warning["request_id"], id.as_str());
    running.terminate().await?;
    Ok(())
}

/// The certificate credential's key and assertions, a federated token and
/// App Service's identity header appear in no log line at trace level,
/// through a token obtained and one refused; the start-up log says which
/// credential is in use and why.
#[tokio::test]
async fn no_key_assertion_or_federated_token_in_any_log_line() -> TestResult {
    let dir = support::pki::scratch_dir()?;
    let (crt, key) = support::pki::make_pair(&dir, "logged", "rsa")?;
    let (crt, key) = (crt.to_string_lossy(), key.to_string_lossy());
    let federated = dir.join("federated");
    let federated_token = "eyJhbGciOiJSUzI1NiJ9.federated-token-claims.federated-signature";
    std::fs::write(&federated, federated_token)?;
    let federated = federated.to_string_lossy();
    let identity_header = "app-service-identity-header-4c1d";
    let identity = FakeIdentity::start(
        serde_json::json!({
            "access_token": "token-from-identity",
            "expires_on": (std::time::SystemTime::now() + Duration::from_secs(3600))
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                .to_string(),
            "token_type": "Bearer",
        })
        .to_string(),
    )
    .await?;
    identity
        .script
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push_back((500, r#"{"error":"unknown_error"}"#.to_owned(), vec![]));
    let identity_url = format!("http://{}/msi/token", identity.addr);
    let cases: [(&str, Vec<(&str, &str)>); 3] = [
        (
            "certificate",
            vec![
                ("BEARER_PROXY_TOKEN_CERTIFICATE_FILE", &crt),
                ("BEARER_PROXY_TOKEN_PRIVATE_KEY_FILE", &key),
            ],
        ),
        (
            "workload_identity",
            vec![
                ("AZURE_FEDERATED_TOKEN_FILE", &federated),
                ("AZURE_CLIENT_ID", "azure-client"),
                ("AZURE_TENANT_ID", "azure-tenant"),
            ],
        ),
        (
            "managed_identity",
            vec![
                ("BEARER_PROXY_TOKEN_CREDENTIAL", "managed_identity"),
                ("IDENTITY_ENDPOINT", &identity_url),
                ("IDENTITY_HEADER", identity_header),
            ],
        ),
    ];
    let key_pem = std::fs::read_to_string(&*key)?;
    for (kind, settings) in cases {
        let token = FakeTokenEndpoint::start().await;
        // A refusal first (logged with the provider's words), then a token.
        token.script([TokenReply::entra_error(
            401,
            "invalid_client",
            700027,
            "Client assertion failed signature validation.",
        )]);
        let upstream = FakeUpstream::start().await;
        let mut env = vec![
            ("API_CLIENT_SECRET", ""),
            ("RUST_LOG", "trace"),
            ("BEARER_PROXY_TOKEN_RETRY_INITIAL", "50ms"),
            // A refused client is tried again at retry_max.
            ("BEARER_PROXY_TOKEN_RETRY_MAX", "100ms"),
        ];
        env.extend(settings);
        let mut running = Running::against(&token, &upstream, &env)?;
        let credential = running.wait_for("credential: ").await?;
        assert_eq!(credential["credential"], kind, "{credential}");
        let ready = running.wait_for("listening").await?;
        let proxy = address(&ready, "listen")?;
        let mut answered = false;
        for _ in 0..200 {
            let response = http1().get(format!("http://{proxy}/x")).send().await?;
            if response.status() == 200 {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered, "{kind}: no token after the refusal");
        let (_, logs) = running.terminate().await?;
        assert!(
            !logs.contains(identity_header),
            "{kind}: the identity header is logged"
        );
        if kind == "managed_identity" {
            assert!(
                logs.contains("unknown_error"),
                "{kind}: the failure is logged"
            );
            continue;
        }
        assert!(
            logs.contains("AADSTS700027"),
            "{kind}: the refusal is logged"
        );
        let sent = token
            .requests()
            .iter()
            .filter_map(|r| r.form.get("client_assertion").cloned())
            .collect::<Vec<_>>();
        assert_eq!(sent.len(), 2, "{kind}");
        for assertion in &sent {
            for part in assertion.split('.') {
                assert!(
                    !logs.contains(part),
                    "{kind}: a part of the assertion is logged"
                );
            }
        }
        assert!(!logs.contains("federated-token-claims"), "{kind}");
        for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(
                !logs.contains(line),
                "{kind}: a line of the private key is logged"
            );
        }
    }
    Ok(())
}
