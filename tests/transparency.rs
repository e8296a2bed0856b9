//! Transparency against a real upstream: httpbin (PyPI) under gunicorn.
//! Each request shape is sent directly and through the proxy (by HTTP/1.1
//! and by h2c); what httpbin saw and what the client got must be identical
//! except for the changes README lists (Authorization, User-Agent,
//! hop-by-hop headers, Expect, a Location under the upstream). Any other
//! difference fails with a readable diff.
//!
//! `.ci/run` installs httpbin and gunicorn, starts it and sets
//! `HTTPBIN_URL`. Elsewhere the test is skipped with a notice unless `CI`
//! is set, where a missing httpbin is a failure.

mod support;

use std::collections::BTreeMap;

use serde_json::Value;
use support::*;

/// One request shape.
struct Shape {
    name: &'static str,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    /// Sent chunked (no Content-Length).
    chunked: bool,
}

fn shape(name: &'static str, method: &'static str, path: &str) -> Shape {
    Shape {
        name,
        method,
        path: path.to_owned(),
        headers: Vec::new(),
        body: None,
        chunked: false,
    }
}

impl Shape {
    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }
}

fn corpus() -> Vec<Shape> {
    let multipart = b"--XyZ\r\nContent-Disposition: form-data; name=\"field\"\r\n\r\nvalue\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n\x00\x01\x02\xff\r\n--XyZ--\r\n".to_vec();
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let mut shapes = Vec::new();
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        shapes.push(shape("each method", method, "/anything/method"));
    }
    shapes.extend([
        shape(
            "query with encoded and repeated keys",
            "GET",
            "/anything/q?a=1&a=2&b=x%20y&c=a+b&d=%2F%3F%26&e=&f",
        ),
        shape(
            "non-ASCII and %2F in the path",
            "GET",
            "/anything/caf%C3%A9/a%2Fb/%E2%9C%93",
        ),
        shape("JSON body", "POST", "/anything/json")
            .header("content-type", "application/json")
            .body(br#"{"qty":2,"name":"b\u00e9","list":[1,2,3]}"#.to_vec()),
        shape("form body", "POST", "/anything/form")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(b"a=1&a=2&b=c%20d&e=%C3%A9".to_vec()),
        shape("multipart body", "POST", "/anything/multipart")
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(multipart),
        shape("binary body", "PUT", "/anything/binary")
            .header("content-type", "application/octet-stream")
            .body(binary.clone()),
        shape("chunked upload", "POST", "/anything/chunked")
            .header("content-type", "application/octet-stream")
            .body(binary)
            .chunked(),
        shape("empty body with a length", "POST", "/anything/empty").body(Vec::new()),
        shape("large header", "GET", "/anything/large").header("x-large", &"v".repeat(7000)),
        shape("Expect: 100-continue", "PUT", "/anything/expect")
            .header("expect", "100-continue")
            .header("content-type", "text/plain")
            .body(b"expected".to_vec()),
        shape("gzip answer", "GET", "/gzip").header("accept-encoding", "gzip"),
        shape("deflate answer", "GET", "/deflate").header("accept-encoding", "deflate"),
        shape("stream", "GET", "/stream/5"),
        shape(
            "stream bytes",
            "GET",
            "/stream-bytes/3000?seed=7&chunk_size=100",
        ),
        shape("drip", "GET", "/drip?numbytes=5&duration=0.2&delay=0"),
        shape("range", "GET", "/range/1024?chunk_size=100").header("range", "bytes=10-99"),
        shape(
            "redirect-to a path",
            "GET",
            "/redirect-to?url=%2Fget&status_code=307",
        ),
        shape(
            "redirect-to elsewhere",
            "GET",
            "/redirect-to?url=https%3A%2F%2Fexample.com%2F",
        ),
        shape("absolute redirect", "GET", "/absolute-redirect/2"),
        shape("relative redirect", "GET", "/relative-redirect/2"),
        shape("cookies set", "GET", "/cookies/set?a=1&b=2"),
        shape("cookies sent", "GET", "/cookies").header("cookie", "a=1; b=2"),
        shape("etag match", "GET", "/etag/abc").header("if-none-match", "\"abc\""),
        shape("etag no match", "GET", "/etag/abc").header("if-none-match", "\"xyz\""),
        shape("etag if-match", "GET", "/etag/abc").header("if-match", "\"xyz\""),
        shape("HEAD", "HEAD", "/get"),
        shape("HEAD of bytes", "HEAD", "/bytes/100?seed=1"),
        shape("bytes", "GET", "/bytes/5000?seed=3"),
        shape(
            "response headers",
            "GET",
            "/response-headers?X-A=1&X-A=2&Cache-Control=no-store",
        ),
        shape("headers echo", "GET", "/headers").header("accept-language", "fr, en;q=0.8"),
        shape("html", "GET", "/html"),
        shape("xml", "GET", "/xml"),
        shape("robots", "GET", "/robots.txt"),
        shape("image", "GET", "/image/png").header("accept", "image/png"),
        shape("base64", "GET", "/base64/aGVsbG8gd29ybGQ%3D"),
        shape("encoding utf8", "GET", "/encoding/utf8"),
        shape("cache", "GET", "/cache")
            .header("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT"),
        shape("post with query", "POST", "/post?x=1")
            .header("content-type", "text/plain")
            .body(b"plain".to_vec()),
        shape("delete with body", "DELETE", "/delete")
            .header("content-type", "application/json")
            .body(b"{}".to_vec()),
    ]);
    let mut many = shape("many headers", "GET", "/anything/many");
    for i in 0..60 {
        many.headers.push(("x-many", format!("{i}")));
    }
    shapes.push(
        many.header("x-other", "1")
            .header("x-many-2", "a")
            .header("x-many-2", "b"),
    );
    for status in [
        200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 418, 429, 500, 502, 503,
    ] {
        shapes.push(Shape {
            name: "status",
            ..shape("status", "GET", &format!("/status/{status}"))
        });
    }
    // Last: a 401 makes the proxy renew its token (and replay once), after
    // which the direct requests would no longer carry the same token.
    shapes.push(shape("status", "GET", "/status/401"));
    shapes.push(shape("basic auth demand", "GET", "/basic-auth/user/pass"));
    shapes
}

/// What a client got.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: BTreeMap<String, Vec<String>>,
    body: Vec<u8>,
}

async fn send(
    client: &reqwest::Client,
    base: &str,
    shape: &Shape,
    listed: &[(&str, &str)],
) -> Result<Got, Box<dyn std::error::Error + Send + Sync>> {
    let method = reqwest::Method::from_bytes(shape.method.as_bytes())?;
    let mut request = client.request(method, format!("{base}{}", shape.path));
    for (name, value) in &shape.headers {
        request = request.header(*name, value);
    }
    for (name, value) in listed {
        request = request.header(*name, *value);
    }
    if let Some(body) = &shape.body {
        if shape.chunked {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let pieces: Vec<Vec<u8>> = body.chunks(16 * 1024).map(<[u8]>::to_vec).collect();
            tokio::spawn(async move {
                for piece in pieces {
                    if tx.send(Ok(piece)).await.is_err() {
                        return;
                    }
                }
            });
            request = request.body(channel_body(rx));
        } else {
            request = request.body(body.clone());
        }
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in response.headers() {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let body = response.bytes().await?.to_vec();
    Ok(Got {
        status,
        headers,
        body,
    })
}

/// The listed response change applied to what went direct: a Location
/// under the upstream points at the proxy.
fn expected_from_direct(mut direct: Got, httpbin: &str) -> Got {
    if let Some(locations) = direct.headers.get_mut("location") {
        for location in locations.iter_mut() {
            if let Some(rest) = location.strip_prefix(httpbin) {
                *location = if rest.starts_with('/') {
                    rest.to_owned()
                } else {
                    format!("/{rest}")
                };
            }
        }
    }
    comparable(direct)
}

/// Sets aside what belongs to one connection, not the message: the
/// connection headers and `Date`; and in httpbin's echo of the request, the
/// framing of an empty body (`Content-Length: 0`, which HTTP/1.1 carries
/// when an h2c request without a body is sent on) and `Expect`, which the
/// proxy answers itself. When the echo is trimmed, its length is too.
fn comparable(mut got: Got) -> Got {
    // And the request id that the proxy returns (and sends upstream).
    for name in [
        "date",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "x-request-id",
    ] {
        got.headers.remove(name);
    }
    let Ok(mut json) = serde_json::from_slice::<Value>(&got.body) else {
        // JSON lines (/stream): compared line by line as JSON, whose object
        // keys httpbin orders by its own environment, not by the wire.
        let text = String::from_utf8_lossy(&got.body).into_owned();
        let lines: Option<Vec<Value>> = text
            .lines()
            .map(|line| serde_json::from_str(line).ok())
            .collect();
        if let Some(lines) = lines.filter(|l| l.len() > 1) {
            got.body = lines
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes();
        }
        return got;
    };
    let Some(headers) = json.get_mut("headers").and_then(Value::as_object_mut) else {
        return got;
    };
    headers.remove("Expect");
    headers.remove("X-Request-Id");
    if headers.get("Content-Length").and_then(Value::as_str) == Some("0") {
        headers.remove("Content-Length");
    }
    if let Ok(body) = serde_json::to_vec_pretty(&json) {
        got.body = body;
        got.headers.remove("content-length");
    }
    got
}

/// gzip's header carries a modification time (bytes 4..8): equal but for it.
fn same_gzip(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.len() > 10 && a[..4] == b[..4] && a[8..] == b[8..]
}

fn diff(shape: &Shape, via: &str, expected: &Got, got: &Got) -> Option<String> {
    let mut report = Vec::new();
    if expected.status != got.status {
        report.push(format!(
            "  status: direct {} / proxy {}",
            expected.status, got.status
        ));
    }
    let names: std::collections::BTreeSet<&String> =
        expected.headers.keys().chain(got.headers.keys()).collect();
    for name in names {
        let (a, b) = (expected.headers.get(name), got.headers.get(name));
        if a != b {
            report.push(format!("  header {name}: direct {a:?} / proxy {b:?}"));
        }
    }
    let gzip = expected
        .headers
        .get("content-encoding")
        .is_some_and(|v| v.iter().any(|e| e == "gzip"));
    if expected.body != got.body && !(gzip && same_gzip(&expected.body, &got.body)) {
        let (a, b) = (
            String::from_utf8_lossy(&expected.body),
            String::from_utf8_lossy(&got.body),
        );
        let line = a
            .lines()
            .zip(b.lines())
            .position(|(x, y)| x != y)
            .unwrap_or(0);
        report.push(format!(
            "  body differs ({} vs {} bytes), first at line {line}:\n    direct: {:.200}\n    proxy:  {:.200}",
            expected.body.len(),
            got.body.len(),
            a.lines().nth(line).unwrap_or_default(),
            b.lines().nth(line).unwrap_or_default()
        ));
    }
    (!report.is_empty()).then(|| {
        format!(
            "{} {} {} via {via}:\n{}",
            shape.name,
            shape.method,
            shape.path,
            report.join("\n")
        )
    })
}

#[tokio::test]
async fn the_proxy_changes_nothing_but_the_listed_headers() -> TestResult {
    let Ok(httpbin) = std::env::var("HTTPBIN_URL") else {
        if std::env::var_os("CI").is_some() {
            return Err(
                "HTTPBIN_URL is not set: .ci/run starts httpbin under gunicorn and sets it".into(),
            );
        }
        eprintln!(
            "skipped: set HTTPBIN_URL to an httpbin (pip install httpbin gunicorn; gunicorn -b 127.0.0.1:8081 httpbin:app)"
        );
        return Ok(());
    };
    let count = compare(httpbin.trim_end_matches('/'), http1(), &[]).await?;
    println!(
        "transparency: {count} shapes, each direct and through the proxy by HTTP/1.1 and h2c: identical"
    );
    Ok(())
}

/// httpbin under hypercorn (PyPI), over TLS with HTTP/2 by ALPN, with a
/// certificate from a CA the test makes; stopped when dropped.
struct Hypercorn {
    _process: Daemon,
    url: String,
}

#[tokio::test]
async fn over_tls_and_http2_the_proxy_changes_nothing_either() -> TestResult {
    let installed = std::process::Command::new("python3")
        .args(["-c", "import hypercorn, httpbin"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !installed {
        if std::env::var_os("CI").is_some() {
            return Err("hypercorn and httpbin are not installed: .ci/run installs them".into());
        }
        eprintln!("skipped: pip install hypercorn httpbin");
        return Ok(());
    }
    let pki = support::pki::Pki::new()?;
    let dir = support::pki::scratch_dir()?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, &pki.cert_pem)?;
    std::fs::write(&key, &pki.key_pem)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let process = Daemon::spawn(
        std::process::Command::new("python3")
            .args(["-m", "hypercorn", "--log-level", "warning", "--bind"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--certfile")
            .arg(&cert)
            .arg("--keyfile")
            .arg(&key)
            .arg("httpbin:app")
            .stdout(std::process::Stdio::null())
            // hypercorn's WSGI adapter logs a traceback for each answer
            // without a body (HEAD, 204, 304), direct or not: kept here,
            // beside the certificate, where a failed run leaves them.
            .stderr(std::fs::File::create(dir.join("hypercorn.log"))?),
    )?;
    let hypercorn = Hypercorn {
        _process: process,
        url: format!("https://localhost:{port}"),
    };
    let direct = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes())?)
        .build()?;
    let mut up = false;
    for _ in 0..200 {
        if let Ok(response) = direct.get(format!("{}/get", hypercorn.url)).send().await {
            assert_eq!(
                response.version(),
                reqwest::Version::HTTP_2,
                "hypercorn speaks HTTP/2"
            );
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(up, "hypercorn did not start");
    let ca = pki.write_ca()?;
    let ca = ca.to_str().ok_or("a UTF-8 path")?;
    let count = compare(&hypercorn.url, direct, &[("BEARER_PROXY_TLS_CA_FILE", ca)]).await?;
    println!(
        "transparency over TLS and HTTP/2: {count} shapes, each direct and through the proxy by HTTP/1.1 and h2c: identical"
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Sends every shape of the corpus to `httpbin` directly (by `direct`)
/// and through a proxy in front of it (with `extra` settings), by
/// HTTP/1.1 and by h2c; fails with every difference. The count of shapes.
async fn compare(
    httpbin: &str,
    direct_client: reqwest::Client,
    extra: &[(&str, &str)],
) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    let token = FakeTokenEndpoint::start().await;
    let proxy = start_proxy(&token, httpbin, extra).await;
    wait_ready(&proxy).await;
    let proxy_base = proxy.url("");
    let corpus = corpus();
    assert!(corpus.len() >= 50, "{} shapes", corpus.len());
    // Sent direct with the proxy's listed request changes already applied:
    // httpbin then sees the same request either way, and echoes it alike.
    let user_agent = concat!("bearer-proxy/", env!("CARGO_PKG_VERSION"));
    let listed = [
        ("authorization", "Bearer token-1"),
        ("user-agent", user_agent),
    ];
    let mut failures = Vec::new();
    for shape in &corpus {
        let direct = expected_from_direct(
            send(&direct_client, httpbin, shape, &listed).await?,
            httpbin,
        );
        for (via, client) in [("HTTP/1.1", http1()), ("h2c", h2c())] {
            let got = comparable(send(&client, &proxy_base, shape, &[]).await?);
            if let Some(report) = diff(shape, via, &direct, &got) {
                failures.push(report);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} exchanges differ:\n{}",
        failures.len(),
        corpus.len() * 2,
        failures.join("\n")
    );
    Ok(corpus.len())
}
