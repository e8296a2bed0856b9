//! An upstream that speaks HTTP/2 by ALPN, as most HTTPS front doors do:
//! nginx (Debian's package) with `listen ... ssl http2` and a certificate
//! from a CA the test makes, in front of the fake upstream, which records
//! what nginx passed on. nginx refuses what RFC 9113 forbids (a `host`
//! beside `:authority`, connection-specific fields) with 400, so every
//! 200 here is a real HTTP/2 server's acceptance.
//!
//! Also what real servers do to a shared connection: a GOAWAY after a
//! number of requests (`keepalive_requests`), closing an idle connection
//! (`keepalive_timeout`), and (from a server made with the `h2` crate, for
//! the exact frames) a stream refused or reset.
//!
//! `.ci/run` installs nginx. Elsewhere the nginx tests are skipped with a
//! notice unless `CI` is set, where a missing nginx is a failure.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::pki::{Pki, scratch_dir};
use support::*;

const USER_AGENT: &str = concat!("bearer-proxy/", env!("CARGO_PKG_VERSION"));

/// nginx as a TLS front with HTTP/2 for `backend`, and a file to download.
struct Nginx {
    process: Option<Daemon>,
    port: u16,
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Stopped before its directory goes.
        drop(self.process.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bytes of `/files/big.bin`.
fn big_file() -> Vec<u8> {
    (0..8 * 1024 * 1024u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
}

impl Nginx {
    /// Starts nginx for `backend` with `server` lines added to its server
    /// block; `None` (skipped, with a notice) where nginx is not installed
    /// and `CI` is not set.
    async fn start(
        pki: &Pki,
        backend: SocketAddr,
        server: &str,
    ) -> Result<Option<Self>, Box<dyn std::error::Error + Send + Sync>> {
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|path| Path::new(path).exists());
        let Some(binary) = binary else {
            if std::env::var_os("CI").is_some() {
                return Err("nginx is not installed: .ci/run installs it (apt nginx)".into());
            }
            eprintln!("skipped: nginx is not installed (apt install nginx)");
            return Ok(None);
        };
        let dir = scratch_dir()?;
        std::fs::write(dir.join("cert.pem"), &pki.cert_pem)?;
        std::fs::write(dir.join("key.pem"), &pki.key_pem)?;
        std::fs::create_dir_all(dir.join("files"))?;
        std::fs::write(dir.join("files/big.bin"), big_file())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let d = dir.display();
        let conf = format!(
            r#"
worker_processes 1;
pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    log_format seen '$server_protocol $request_method $request_uri $status host=$http_host connection=$connection';
    access_log {d}/access.log seen;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 64m;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        {server}
        location / {{
            proxy_pass http://{backend};
            proxy_http_version 1.1;
            proxy_request_buffering off;
            proxy_set_header X-Seen-Protocol $server_protocol;
            proxy_set_header X-Seen-Host $http_host;
        }}
        location /files/ {{
            alias {d}/files/;
            add_trailer X-Trailer-Check done;
        }}
    }}
}}
"#
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let process = Daemon::spawn(
            Command::new(binary)
                .arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .args(["-g", "daemon off;"])
                .stdout(Stdio::null()),
        )?;
        let nginx = Nginx {
            process: Some(process),
            port,
            dir,
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Some(nginx));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(format!("nginx did not start: {}", nginx.error_log()).into())
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// One line per request: protocol, method, URI, status, Host, and the
    /// connection's serial number.
    fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The distinct connections that carried requests.
    fn connections(&self) -> std::collections::BTreeSet<String> {
        self.access_log()
            .iter()
            .filter_map(|line| line.split("connection=").nth(1).map(str::to_owned))
            .collect()
    }
}

/// The proxy in front of `nginx`, trusting the test's CA; ready.
async fn proxy_to_nginx(
    pki: &Pki,
    nginx: &Nginx,
    extra: &[(&str, &str)],
) -> Result<(FakeTokenEndpoint, Proxy), Box<dyn std::error::Error + Send + Sync>> {
    let ca = pki.write_ca()?;
    let ca = ca.to_str().ok_or("a UTF-8 path")?.to_owned();
    let mut settings = vec![("BEARER_PROXY_TLS_CA_FILE", ca.as_str())];
    settings.extend_from_slice(extra);
    Ok(ready_proxy_to(&format!("{}/api", nginx.url()), &settings).await)
}

#[tokio::test]
async fn every_request_shape_reaches_an_http2_nginx() -> TestResult {
    let pki = Pki::new()?;
    let backend = FakeUpstream::start().await;
    let Some(nginx) = Nginx::start(&pki, backend.addr, "").await? else {
        return Ok(());
    };
    let (_token, proxy) = proxy_to_nginx(&pki, &nginx, &[]).await?;

    for (via, client) in [("HTTP/1.1", http1()), ("h2c", h2c())] {
        // Without a body, and with one small enough to be held for a replay.
        let response = client
            .get(proxy.url("/get?x=1"))
            .header("x-custom", "kept")
            .send()
            .await?;
        assert_eq!(
            response.status(),
            200,
            "GET via {via}: {}",
            nginx.error_log()
        );
        let seen = backend.last();
        assert_eq!(seen.target_str(), "/api/get?x=1");
        assert_eq!(seen.header("x-seen-protocol"), Some("HTTP/2.0"), "{via}");
        assert_eq!(
            seen.header("x-seen-host"),
            Some(format!("localhost:{}", nginx.port).as_str()),
            "{via}: the authority"
        );
        assert_eq!(seen.header("authorization"), Some("Bearer token-1"));
        assert_eq!(seen.header("user-agent"), Some(USER_AGENT));
        assert_eq!(seen.header("x-custom"), Some("kept"));

        let response = client
            .post(proxy.url("/post"))
            .header("content-type", "application/json")
            .body(r#"{"a":1}"#)
            .send()
            .await?;
        assert_eq!(response.status(), 200, "POST via {via}");
        let seen = backend.last();
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.body, br#"{"a":1}"#);
        assert_eq!(seen.header("content-type"), Some("application/json"));
    }

    // Hop-by-hop fields from an HTTP/1.1 client go no further.
    let answer = raw(
        proxy.addr,
        b"GET /hop HTTP/1.1\r\nHost: localhost\r\nConnection: close, x-private\r\nKeep-Alive: 5\r\nX-Private: 1\r\nTE: gzip\r\nProxy-Connection: keep-alive\r\n\r\n",
    )
    .await?;
    assert_eq!(answer.status, 200, "{}", nginx.error_log());
    let seen = backend.last();
    for name in ["x-private", "keep-alive", "proxy-connection"] {
        assert_eq!(seen.header(name), None, "{name}");
    }
    assert!(
        nginx
            .access_log()
            .iter()
            .all(|line| line.starts_with("HTTP/2.0 ")),
        "{:?}",
        nginx.access_log()
    );
    Ok(())
}

#[tokio::test]
async fn large_bodies_and_trailers_cross_an_http2_nginx() -> TestResult {
    let pki = Pki::new()?;
    let backend = FakeUpstream::start().await;
    let Some(nginx) = Nginx::start(&pki, backend.addr, "").await? else {
        return Ok(());
    };
    let (_token, proxy) = proxy_to_nginx(&pki, &nginx, &[]).await?;

    for (via, client) in [("HTTP/1.1", http1()), ("h2c", h2c())] {
        // A 3 MiB upload, streamed (larger than the replay buffer), with
        // a length and chunked.
        let upload: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
        let response = client
            .put(proxy.url("/upload"))
            .body(upload.clone())
            .send()
            .await?;
        assert_eq!(response.status(), 200, "upload via {via}");
        assert_eq!(backend.last().body, upload, "upload via {via}");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let pieces: Vec<Vec<u8>> = upload.chunks(64 * 1024).map(<[u8]>::to_vec).collect();
        tokio::spawn(async move {
            for piece in pieces {
                if tx.send(Ok(piece)).await.is_err() {
                    return;
                }
            }
        });
        let response = client
            .post(proxy.url("/upload/chunked"))
            .body(channel_body(rx))
            .send()
            .await?;
        assert_eq!(response.status(), 200, "chunked upload via {via}");
        assert_eq!(backend.last().body, upload, "chunked upload via {via}");
    }

    // The file comes from nginx itself, under a second prefix.
    let ca = pki.write_ca()?;
    let ca = ca.to_str().ok_or("a UTF-8 path")?.to_owned();
    let files = ready_proxy_to(
        &format!("{}/files", nginx.url()),
        &[("BEARER_PROXY_TLS_CA_FILE", ca.as_str())],
    )
    .await
    .1;
    for (via, client) in [("HTTP/1.1", http1()), ("h2c", h2c())] {
        let response = client.get(files.url("/big.bin")).send().await?;
        assert_eq!(response.status(), 200, "{via}");
        let body = response.bytes().await?;
        assert!(body.as_ref() == big_file().as_slice(), "8 MiB via {via}");
    }
    // nginx's trailers (`add_trailer`) reach an HTTP/2 client. (nginx
    // sends the file's length, so an HTTP/1.1 client, which could have
    // trailers only with a chunked body, gets the body without them.)
    let (body, trailers) = h2c_get_with_trailers(files.addr, "/big.bin").await?;
    assert!(body == big_file(), "the body before the trailers");
    assert_eq!(
        trailers
            .as_ref()
            .and_then(|t| t.get("x-trailer-check"))
            .map(|v| v.as_bytes()),
        Some(&b"done"[..]),
        "{trailers:?}"
    );
    Ok(())
}

/// A GET over h2c by hyper's client, which, unlike reqwest, gives the
/// trailers.
async fn h2c_get_with_trailers(
    addr: SocketAddr,
    path: &str,
) -> Result<(Vec<u8>, Option<http::HeaderMap>), Box<dyn std::error::Error + Send + Sync>> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(connection);
    let request = http::Request::get(format!("http://localhost{path}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let collected = response.into_body().collect().await?;
    let trailers = collected.trailers().cloned();
    Ok((collected.to_bytes().to_vec(), trailers))
}

#[tokio::test]
async fn a_401_over_http2_is_replayed_with_a_new_token() -> TestResult {
    let pki = Pki::new()?;
    // The first token is refused, the next accepted.
    let backend = FakeUpstream::with(|seen| {
        if seen.bearer() == "token-1" {
            Reply::status(401)
        } else {
            Reply::ok("welcome")
        }
    })
    .await;
    let Some(nginx) = Nginx::start(&pki, backend.addr, "").await? else {
        return Ok(());
    };
    let (token, proxy) = proxy_to_nginx(&pki, &nginx, &[]).await?;
    let response = h2c()
        .post(proxy.url("/orders"))
        .body("order")
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await?, "welcome");
    let seen = backend.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen.iter().map(|r| r.bearer()).collect::<Vec<_>>(),
        ["token-1", "token-2"]
    );
    assert!(seen.iter().all(|r| r.body == b"order"));
    assert_eq!(token.count(), 2);
    Ok(())
}

#[tokio::test]
async fn a_goaway_after_some_requests_loses_none() -> TestResult {
    let pki = Pki::new()?;
    let backend = FakeUpstream::start().await;
    let Some(nginx) = Nginx::start(&pki, backend.addr, "keepalive_requests 3;").await? else {
        return Ok(());
    };
    let (_token, proxy) = proxy_to_nginx(&pki, &nginx, &[]).await?;
    let client = h2c();
    for i in 0..12 {
        let response = client.get(proxy.url(&format!("/one/{i}"))).send().await?;
        assert_eq!(response.status(), 200, "request {i}");
    }
    // Side by side: some streams start beyond what nginx takes.
    for round in 0..3 {
        let mut sending = Vec::new();
        for i in 0..16 {
            let (client, url) = (client.clone(), proxy.url(&format!("/many/{round}/{i}")));
            sending.push(tokio::spawn(async move {
                let response = if i % 2 == 0 {
                    client.get(url).send().await?
                } else {
                    client.post(url).body(format!("body {i}")).send().await?
                };
                let status = response.status().as_u16();
                Ok::<_, reqwest::Error>((status, response.text().await?))
            }));
        }
        for (i, sent) in sending.into_iter().enumerate() {
            let (status, text) = sent.await??;
            assert_eq!(status, 200, "round {round}, request {i}: {text}");
        }
    }
    assert_eq!(backend.requests().len(), 12 + 48);
    // One new connection after each GOAWAY, shared by the requests that
    // wait for it: 20 would do for 60 requests, 3 to a connection; a
    // request refused 3 times in a row gets one of its own.
    let connections = nginx.connections().len();
    println!("{connections} connections for 60 requests");
    assert!(
        connections <= 40,
        "{connections} connections for 60 requests"
    );
    Ok(())
}

#[tokio::test]
async fn with_http2_off_an_http2_upstream_is_spoken_to_in_http1() -> TestResult {
    let pki = Pki::new()?;
    let backend = FakeUpstream::start().await;
    let Some(nginx) = Nginx::start(&pki, backend.addr, "").await? else {
        return Ok(());
    };
    let (_token, proxy) =
        proxy_to_nginx(&pki, &nginx, &[("BEARER_PROXY_UPSTREAM_HTTP2", "false")]).await?;
    let client = h2c();
    for i in 0..3 {
        let response = client.get(proxy.url(&format!("/one/{i}"))).send().await?;
        assert_eq!(response.status(), 200, "GET {i}: {}", nginx.error_log());
        let seen = backend.last();
        assert_eq!(seen.header("x-seen-protocol"), Some("HTTP/1.1"));
        assert_eq!(seen.header("authorization"), Some("Bearer token-1"));
    }
    let response = client
        .post(proxy.url("/post"))
        .body("a body")
        .send()
        .await?;
    assert_eq!(response.status(), 200, "POST: {}", nginx.error_log());
    assert_eq!(backend.last().body, b"a body");
    let log = nginx.access_log();
    assert_eq!(log.len(), 4, "{log:?}");
    assert!(
        log.iter().all(|line| line.starts_with("HTTP/1.1 ")),
        "{log:?}"
    );
    // One after another, the requests took the warm connection, kept alive.
    assert_eq!(nginx.connections().len(), 1, "{log:?}");
    Ok(())
}

#[tokio::test]
async fn a_connection_the_server_closed_when_idle_is_replaced() -> TestResult {
    let pki = Pki::new()?;
    let backend = FakeUpstream::start().await;
    let Some(nginx) = Nginx::start(&pki, backend.addr, "keepalive_timeout 1s;").await? else {
        return Ok(());
    };
    let (_token, proxy) = proxy_to_nginx(&pki, &nginx, &[]).await?;
    let client = h2c();
    for i in 0..3 {
        let response = client.get(proxy.url(&format!("/idle/{i}"))).send().await?;
        assert_eq!(response.status(), 200, "request {i}");
        // Past nginx's idle limit: it has closed the connection.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert_eq!(backend.requests().len(), 3);
    assert_eq!(nginx.connections().len(), 3, "{:?}", nginx.access_log());
    Ok(())
}

/// What the `h2` server does with a stream, by its number (from 0, over
/// all connections).
#[derive(Clone, Copy, PartialEq)]
enum Act {
    Answer,
    /// `RST_STREAM(REFUSED_STREAM)`: not processed (RFC 9113 §8.7).
    Refuse,
    /// `RST_STREAM(INTERNAL_ERROR)`: failed, perhaps after acting on it.
    Reset,
}

/// A stream as the `h2` server received it: pseudo-headers, fields, body.
#[derive(Debug, Clone)]
struct Stream {
    method: String,
    uri: String,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
}

type Streams = std::sync::Arc<std::sync::Mutex<Vec<Stream>>>;

/// An HTTP/2-only TLS server made with the `h2` crate, for the exact
/// frames: each stream is recorded, then answered `200 ok`, refused or
/// reset as `act` says.
async fn h2_server(
    pki: &Pki,
    act: fn(usize) -> Act,
) -> Result<(SocketAddr, Streams), Box<dyn std::error::Error + Send + Sync>> {
    let streams = Streams::default();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = streams.clone();
    let addr = support::pki::TlsServer {
        alpn: &[b"h2"],
        require_client_cert: false,
    }
    .serve(pki, move |tls| {
        let (seen, count) = (seen.clone(), count.clone());
        async move {
            let Ok(mut connection) = h2::server::handshake(tls).await else {
                return;
            };
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let (parts, mut body) = request.into_parts();
                    let mut data = Vec::new();
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        data.extend_from_slice(&chunk);
                    }
                    let fields = parts
                        .headers
                        .iter()
                        .map(|(name, value)| {
                            (
                                name.as_str().to_owned(),
                                String::from_utf8_lossy(value.as_bytes()).into_owned(),
                            )
                        })
                        .collect();
                    seen.lock().unwrap_or_else(|e| e.into_inner()).push(Stream {
                        method: parts.method.to_string(),
                        uri: parts.uri.to_string(),
                        fields,
                        body: data,
                    });
                    match act(n) {
                        Act::Answer => {
                            if let Ok(mut send) =
                                respond.send_response(http::Response::new(()), false)
                            {
                                let _ = send.send_data(bytes::Bytes::from_static(b"ok"), true);
                            }
                        }
                        Act::Refuse => respond.send_reset(h2::Reason::REFUSED_STREAM),
                        Act::Reset => respond.send_reset(h2::Reason::INTERNAL_ERROR),
                    }
                });
            }
        }
    })
    .await?;
    Ok((addr, streams))
}

async fn proxy_to_h2_server(
    pki: &Pki,
    addr: SocketAddr,
) -> Result<(FakeTokenEndpoint, Proxy), Box<dyn std::error::Error + Send + Sync>> {
    let ca = pki.write_ca()?;
    let ca = ca.to_str().ok_or("a UTF-8 path")?.to_owned();
    Ok(ready_proxy_to(
        &format!("https://localhost:{}/api", addr.port()),
        &[("BEARER_PROXY_TLS_CA_FILE", ca.as_str())],
    )
    .await)
}

fn recorded(streams: &Streams) -> Vec<Stream> {
    streams.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[tokio::test]
async fn over_http2_the_authority_goes_in_authority_alone() -> TestResult {
    let pki = Pki::new()?;
    let (addr, streams) = h2_server(&pki, |_| Act::Answer).await?;
    let (_token, proxy) = proxy_to_h2_server(&pki, addr).await?;
    // From an HTTP/1.1 client with every hop-by-hop field, and one that
    // takes trailers; from an h2c client.
    let answer = raw(
        proxy.addr,
        b"GET /one?q=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close, x-private\r\nKeep-Alive: 5\r\nX-Private: 1\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nUpgrade-Insecure-Requests: 1\r\nX-Kept: yes\r\n\r\n",
    )
    .await?;
    assert_eq!(answer.status, 200);
    let response = h2c().post(proxy.url("/two")).body("2").send().await?;
    assert_eq!(response.status(), 200);
    let seen = recorded(&streams);
    assert_eq!(seen.len(), 2);
    let authority = format!("https://localhost:{}", addr.port());
    assert_eq!(seen[0].uri, format!("{authority}/api/one?q=1"));
    assert_eq!(seen[1].uri, format!("{authority}/api/two"));
    assert_eq!(
        (seen[1].method.as_str(), seen[1].body.as_slice()),
        ("POST", &b"2"[..])
    );
    for stream in &seen {
        let names: Vec<&str> = stream.fields.iter().map(|(n, _)| n.as_str()).collect();
        for forbidden in [
            "host",
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
            "x-private",
        ] {
            assert!(!names.contains(&forbidden), "{forbidden} in {names:?}");
        }
        assert!(names.contains(&"authorization") && names.contains(&"user-agent"));
    }
    let first = &seen[0].fields;
    assert!(
        first.contains(&("te".into(), "trailers".into())),
        "{first:?}"
    );
    assert!(
        first.contains(&("x-kept".into(), "yes".into())),
        "{first:?}"
    );
    assert!(first.contains(&("upgrade-insecure-requests".into(), "1".into())));
    Ok(())
}

#[tokio::test]
async fn a_refused_stream_is_sent_again_whatever_its_method() -> TestResult {
    let pki = Pki::new()?;
    // The second stream is refused (the first warms the connection up).
    let (addr, streams) =
        h2_server(&pki, |n| if n == 1 { Act::Refuse } else { Act::Answer }).await?;
    let (_token, proxy) = proxy_to_h2_server(&pki, addr).await?;
    let client = h2c();
    assert_eq!(client.get(proxy.url("/warm")).send().await?.status(), 200);
    let response = client
        .post(proxy.url("/order"))
        .body("one order")
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let seen = recorded(&streams);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen[1..]
            .iter()
            .all(|s| s.method == "POST" && s.body == b"one order")
    );
    Ok(())
}

#[tokio::test]
async fn a_reset_stream_is_the_upstreams_answer_and_not_sent_again() -> TestResult {
    let pki = Pki::new()?;
    let (addr, streams) =
        h2_server(&pki, |n| if n == 0 { Act::Answer } else { Act::Reset }).await?;
    let (_token, proxy) = proxy_to_h2_server(&pki, addr).await?;
    let client = h2c();
    assert_eq!(client.get(proxy.url("/warm")).send().await?.status(), 200);
    for (i, method) in [reqwest::Method::POST, reqwest::Method::GET]
        .into_iter()
        .enumerate()
    {
        let response = client
            .request(method.clone(), proxy.url("/reset"))
            .body("x")
            .send()
            .await?;
        assert_proxy_error(&response, 502, "upstream_unreachable");
        let text = response.text().await?;
        assert!(
            text.contains("INTERNAL_ERROR") || text.contains("internal error"),
            "{text}"
        );
        assert_eq!(recorded(&streams).len(), 2 + i, "{method} sent once");
    }
    Ok(())
}

#[tokio::test]
async fn check_succeeds_against_an_http2_upstream() -> TestResult {
    let pki = Pki::new()?;
    let backend = FakeUpstream::start().await;
    let Some(nginx) = Nginx::start(&pki, backend.addr, "").await? else {
        return Ok(());
    };
    let token = FakeTokenEndpoint::start().await;
    let ca = pki.write_ca()?;
    let upstream = format!("{}/api", nginx.url());
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_bearer-proxy"))
        .env_clear()
        .arg("check")
        .envs([
            ("API_CLIENT_ID", CLIENT_ID),
            ("API_CLIENT_SECRET", CLIENT_SECRET),
            ("API_TOKEN_URL", token.url().as_str()),
            ("BEARER_PROXY_UPSTREAM", upstream.as_str()),
            (
                "BEARER_PROXY_TLS_CA_FILE",
                ca.to_str().ok_or("a UTF-8 path")?,
            ),
        ])
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("protocol        HTTP/2"), "{stdout}");
    assert!(stdout.contains("HTTP 200 OK"), "{stdout}");
    assert_eq!(backend.last().target_str(), "/api/api/status");
    assert_eq!(backend.last().header("x-seen-protocol"), Some("HTTP/2.0"));
    Ok(())
}
