//! The clients that legacy apps are written with, each in its default
//! configuration, through the proxy to real servers: httpbin (PyPI) as the
//! HTTP upstream and a Python `websockets` echo server as the WebSocket
//! one. For each HTTP client: a GET with a repeated and percent-encoded
//! query, a JSON POST, a 5 MiB upload echoed back (a download of as much),
//! a redirect to the upstream's own URL followed back through the proxy,
//! 20 sequential requests on one client object over one connection, and
//! the status path with the token masked (and the real token and the
//! proxy's User-Agent at the upstream). For WebSocket: text and binary
//! both ways, a 1 MiB message, ping and pong, a close code.
//!
//! Needs `HTTPBIN_URL` and `WS_ECHO_URL` (`.ci/run` installs the clients
//! and starts both servers); skipped with a notice without them. With them,
//! a missing client is a failure: the matrix is the point.
//!
//! `cargo test --test clients -- --nocapture` prints the results table.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The token that the fake provider issues first.
const TOKEN: &str = "token-1";

/// What a relay saw of a client.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    /// The client offered h2c (`Upgrade: h2c`) on some request.
    offered_h2c: AtomicBool,
}

/// A TCP relay in front of `to` that counts the connections it accepts
/// (how a client reused its connection shows here, whatever the client)
/// and notes whether the client offered h2c.
async fn counting_relay(to: SocketAddr) -> std::io::Result<(String, Arc<Seen>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Seen::default());
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            record.connections.fetch_add(1, Ordering::SeqCst);
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(proxy) = TcpStream::connect(to).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_proxy, mut to_proxy) = proxy.into_split();
                let up = async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = from_client.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let lower = buf[..n].to_ascii_lowercase();
                        if lower.windows(13).any(|w| w == b"upgrade: h2c\r") {
                            record.offered_h2c.store(true, Ordering::SeqCst);
                        }
                        if to_proxy.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = to_proxy.shutdown().await;
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut from_proxy, &mut to_client).await;
                    let _ = to_client.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    Ok((format!("http://{addr}"), seen))
}

/// One client's run: its name, the checks it passed, what went wrong.
struct Run {
    client: String,
    passed: Vec<String>,
    failure: Option<String>,
    /// Connections that the 20 sequential requests opened.
    connections: usize,
    /// Checks it must pass.
    expected: usize,
    /// It offered h2c, as it does as it comes (and must have).
    offered_h2c: Option<bool>,
}

/// Runs `program args`, whose checks print `ok NAME` lines and `FAILED`
/// on the first that fails.
async fn run_script(program: &str, args: &[String]) -> (Vec<String>, Option<String>) {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let output = match output {
        Ok(Ok(output)) => output,
        Ok(Err(error)) => {
            return (
                Vec::new(),
                Some(format!("{program} did not start: {error}")),
            );
        }
        Err(_) => return (Vec::new(), Some(format!("{program} took over 120 s"))),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let passed: Vec<String> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("ok ").map(str::to_owned))
        .collect();
    let failure = (!output.status.success()).then(|| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAILED")).collect();
        format!(
            "{} {}",
            failed.join("; "),
            stderr.chars().take(2000).collect::<String>()
        )
    });
    (passed, failure)
}

/// curl, run once per check, as a script does.
async fn curl(
    mode: &[&str],
    base: &str,
    reuse: &str,
    upstream: &str,
    work: &Path,
) -> (Vec<String>, Option<String>) {
    let mut passed = Vec::new();
    let prior_knowledge = mode.contains(&"--http2-prior-knowledge");
    let run = |args: Vec<String>| async move {
        let output = tokio::process::Command::new("curl")
            .args(["-sSf", "--max-time", "60"])
            .args(mode)
            .args(&args)
            .output()
            .await
            .map_err(|e| format!("curl did not start: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "curl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    };
    let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap_or_default();
    macro_rules! check {
        ($name:expr, $condition:expr, $detail:expr) => {
            if !$condition {
                return (passed, Some(format!("{}: {}", $name, $detail)));
            }
            passed.push($name.to_owned());
        };
    }
    macro_rules! attempt {
        ($result:expr) => {
            match $result {
                Ok(value) => value,
                Err(error) => return (passed, Some(error)),
            }
        };
    }

    let out = attempt!(
        run(vec![
            "-g".into(),
            format!("{base}/anything?a=1&a=2&q=%2F%20x")
        ])
        .await
    );
    let echo = json(&out);
    check!(
        "query",
        echo["args"] == serde_json::json!({"a": ["1", "2"], "q": "/ x"}),
        out
    );
    if mode.contains(&"--http2") {
        let headers = &echo["headers"];
        check!(
            "h2c offer not forwarded",
            headers.get("Upgrade").is_none() && headers.get("Http2-Settings").is_none(),
            out
        );
    }

    let body = r#"{"name":"bearer","n":[1,2,3]}"#;
    let out = attempt!(
        run(vec![
            "-H".into(),
            "Content-Type: application/json".into(),
            "--data-binary".into(),
            body.into(),
            format!("{base}/anything"),
        ])
        .await
    );
    let echo = json(&out);
    check!(
        "json post",
        echo["data"] == body && echo["headers"]["Content-Type"] == "application/json",
        out
    );

    let file = work.join(format!("upload-{}.txt", mode.join("")));
    let upload = vec![b'x'; 5 * 1024 * 1024];
    attempt!(std::fs::write(&file, &upload).map_err(|e| e.to_string()));
    let out = attempt!(
        run(vec![
            "-H".into(),
            "Content-Type: text/plain".into(),
            "--data-binary".into(),
            format!("@{}", file.display()),
            format!("{base}/anything"),
        ])
        .await
    );
    let echo = json(&out);
    check!(
        "5 MiB upload, echoed back",
        echo["data"].as_str().map(str::len) == Some(upload.len()),
        out.len()
    );

    let target: String =
        form_urlencoded::byte_serialize(format!("{upstream}/anything/redirected").as_bytes())
            .collect();
    let redirect = format!("{base}/redirect-to?url={target}");
    let (answer, effective) = if prior_knowledge {
        // curl 7.88 cannot reuse a prior-knowledge connection (curl bug
        // 10634, fixed in 8.0): a second curl follows the redirect.
        let location = attempt!(
            run(vec![
                "-o".into(),
                "/dev/null".into(),
                "-w".into(),
                "%{redirect_url}".into(),
                redirect
            ])
            .await
        );
        (attempt!(run(vec![location.clone()]).await), location)
    } else {
        let out = attempt!(
            run(vec![
                "-L".into(),
                "-w".into(),
                "\n%{url_effective}".into(),
                redirect
            ])
            .await
        );
        let (answer, effective) = out.rsplit_once('\n').unwrap_or((&out, ""));
        (answer.to_owned(), effective.to_owned())
    };
    check!(
        "redirect followed back through the proxy",
        effective.starts_with(base)
            && json(&answer)["url"]
                .as_str()
                .is_some_and(|u| u.ends_with("/anything/redirected")),
        answer
    );

    // One curl, 20 URLs: curl reuses its connection between them.
    if !prior_knowledge {
        let mut args = Vec::new();
        for _ in 0..20 {
            args.push(format!("{reuse}/anything"));
            args.push("-o".into());
            args.push("/dev/null".into());
        }
        attempt!(run(args).await);
        passed.push("20 sequential requests".to_owned());
    }

    let out = attempt!(run(vec![format!("{base}/anything/status")]).await);
    check!(
        "status path masked",
        out.contains("[masked]") && !out.contains(TOKEN),
        out
    );
    let out = attempt!(run(vec![format!("{base}/anything")]).await);
    let headers = &json(&out)["headers"];
    check!(
        "token and User-Agent at the upstream",
        headers["Authorization"] == format!("Bearer {TOKEN}")
            && headers["User-Agent"]
                .as_str()
                .is_some_and(|ua| ua.starts_with("bearer-proxy/")),
        out
    );
    (passed, None)
}

#[tokio::test]
async fn every_client_in_its_default_configuration() -> TestResult {
    let (Ok(httpbin), Ok(ws_echo)) = (std::env::var("HTTPBIN_URL"), std::env::var("WS_ECHO_URL"))
    else {
        eprintln!("skipped: HTTPBIN_URL and WS_ECHO_URL are not both set (.ci/run sets them)");
        return Ok(());
    };
    let scripts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients");
    let work = tempfile_dir()?;
    let (_token, proxy) = ready_proxy_to(
        &httpbin,
        &[("BEARER_PROXY_PROXY_MASK_TOKEN_IN", "/anything/status")],
    )
    .await;
    let script = |name: &str| scripts.join(name).display().to_string();

    // Name, program (none: curl), arguments, checks, whether it offers h2c.
    type Client = (&'static str, &'static str, Vec<String>, usize, Option<bool>);
    let http_clients: Vec<Client> = vec![
        ("curl (HTTP/1.1)", "", vec![], 7, Some(false)),
        (
            "curl --http2 (h2c offer)",
            "",
            vec!["--http2".into()],
            8,
            Some(true),
        ),
        (
            "curl --http2-prior-knowledge",
            "",
            vec!["--http2-prior-knowledge".into()],
            6,
            Some(false),
        ),
        (
            "curl --http1.0",
            "",
            vec!["--http1.0".into()],
            7,
            Some(false),
        ),
        (
            "Python requests (Session)",
            "python3",
            vec![script("http_client.py"), "requests".into()],
            7,
            Some(false),
        ),
        (
            "Python httpx (Client)",
            "python3",
            vec![script("http_client.py"), "httpx".into()],
            7,
            Some(false),
        ),
        (
            "Node fetch",
            "node",
            vec![script("fetch.mjs")],
            7,
            Some(false),
        ),
        (
            "Java HttpClient.newHttpClient()",
            "java",
            vec![script("Client.java")],
            9,
            Some(true),
        ),
    ];
    let mut runs = Vec::new();
    for (client, program, args, expected, offers_h2c) in http_clients {
        let (base, seen) = counting_relay(proxy.addr).await?;
        let (reuse, reused) = counting_relay(proxy.addr).await?;
        let (passed, failure) = if program.is_empty() {
            let mode: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(&mode, &base, &reuse, &httpbin, &work).await
        } else {
            let mut args = args;
            args.extend([base, reuse, TOKEN.to_owned(), httpbin.clone()]);
            run_script(program, &args).await
        };
        let offered = seen.offered_h2c.load(Ordering::SeqCst);
        runs.push(Run {
            client: client.to_owned(),
            passed,
            failure,
            connections: reused.connections.load(Ordering::SeqCst),
            expected,
            offered_h2c: offers_h2c.map(|wanted| offered == wanted),
        });
    }

    let (ws_proxy_token, ws_proxy) = ready_proxy_to(&ws_echo, &[]).await;
    let (relay, ws_seen) = counting_relay(ws_proxy.addr).await?;
    let url = format!("{}/ws?room=1", relay.replacen("http://", "ws://", 1));
    let (passed, failure) =
        run_script("python3", &[script("ws_client.py"), url, TOKEN.to_owned()]).await;
    runs.push(Run {
        client: "Python websockets".to_owned(),
        passed,
        failure,
        connections: ws_seen.connections.load(Ordering::SeqCst),
        expected: 7,
        offered_h2c: None,
    });
    drop(ws_proxy_token);

    println!("| client | checks passed | connections for 20 requests | result |");
    println!("|---|---|---|---|");
    let mut failures = Vec::new();
    for run in &runs {
        // Exceptions, each the client's own doing: an HTTP/1.0 client
        // closes after each answer unless it asks otherwise (curl --http1.0
        // does not ask); curl 7.88 cannot reuse an HTTP/2 prior-knowledge
        // connection (its bug 10634), so that mode makes no such run; Node's
        // fetch (undici) opens a second connection while it releases the
        // first, and the two then take turns.
        let allowed = if run.client.contains("1.0") {
            20
        } else if run.client.contains("prior-knowledge") {
            0
        } else if run.client.contains("Node") {
            2
        } else {
            1
        };
        let one_connection = run.connections <= allowed && (allowed == 0 || run.connections > 0);
        let result = match (&run.failure, one_connection) {
            (Some(failure), _) => format!("FAIL: {failure}"),
            (None, false) => format!("FAIL: {} connections", run.connections),
            (None, true) if run.passed.len() != run.expected => {
                format!("FAIL: {} of {} checks ran", run.passed.len(), run.expected)
            }
            (None, true) if run.offered_h2c == Some(false) => {
                "FAIL: it did not offer h2c as expected (or offered it unexpectedly)".to_owned()
            }
            (None, true) => "pass".to_owned(),
        };
        println!(
            "| {} | {} | {} | {} |",
            run.client,
            run.passed.len(),
            run.connections,
            result.replace('\n', " ")
        );
        if result != "pass" {
            failures.push(format!("{}: {result}", run.client));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bearer-proxy-clients-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
