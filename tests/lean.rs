//! The lean HTTP/1.1 path (requests without a body, served without hyper's
//! server) answers exactly as hyper's server does, hands a connection to
//! hyper when a request needs it, and keeps hyper's connection rules.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the upstream answers, by the request's path.
const ANSWERS: &[(&str, &[u8])] = &[
    (
        "/sized",
        b"HTTP/1.1 200 OK\r\ndate: Sun, 06 Nov 1994 08:49:37 GMT\r\ncontent-type: text/plain\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
    ),
    (
        "/no-date",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi",
    ),
    (
        "/chunked",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    ),
    (
        "/trailers",
        b"HTTP/1.1 200 OK\r\ntrailer: x-checksum, content-type\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n2\r\nhi\r\n0\r\nx-checksum: abc\r\ncontent-type: text/evil\r\n\r\n",
    ),
    (
        "/no-content",
        b"HTTP/1.1 204 No Content\r\nx-request-id: 7\r\nconnection: close\r\n\r\n",
    ),
    (
        "/not-modified",
        b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 10\r\nconnection: close\r\n\r\n",
    ),
    (
        "/reason",
        b"HTTP/1.1 404 Nothing Here\r\ncontent-length: 3\r\nconnection: close\r\n\r\nnah",
    ),
    (
        "/until-close",
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nuntil the end",
    ),
    (
        "/repeated",
        b"HTTP/1.1 201 Created\r\nset-cookie: a=1\r\nx-b: 1\r\nset-cookie: b=2\r\nx-b: 2\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    ),
    (
        "/head",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\nconnection: close\r\n\r\n",
    ),
    (
        "/as-sent",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Hop: secret\r\nSet-Cookie: a=1\r\nKeep-Alive: timeout=5\r\nX-Other: 1\r\nSET-COOKIE: b=2\r\nConnection: X-Hop, close\r\nContent-Length: 2\r\nTrailer: X-Sum\r\n\r\nok",
    ),
    ("/large-head", b""),
    (
        "/both-lengths",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\nX-B: 2\r\nConnection: close\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ),
];

/// An upstream that answers each request from `ANSWERS`, after reading the
/// request whole (a chunked one to its end), so that no unread byte makes
/// its close a reset.
async fn scripted_upstream() -> std::io::Result<std::net::SocketAddr> {
    let (addr, _) = raw_upstream(|mut stream, mut head| async move {
        let chunked = String::from_utf8_lossy(&head)
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let mut buf = [0u8; 1024];
        while chunked && !head.ends_with(b"0\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let path = text.split(' ').nth(1).unwrap_or_default().to_owned();
        let answer = match ANSWERS.iter().find(|(p, _)| *p == path) {
            // Over 8 KiB: the proxy reads its fields into a map.
            Some(_) if path == "/large-head" => format!(
                "HTTP/1.1 200 OK\r\nX-Big: {}\r\nx-a: 1\r\nX-BIG: 2\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                "v".repeat(9000)
            )
            .into_bytes(),
            Some((_, answer)) => answer.to_vec(),
            None => b"HTTP/1.1 500 Unknown\r\ncontent-length: 0\r\n\r\n".to_vec(),
        };
        let _ = stream.write_all(&answer).await;
        let _ = stream.shutdown().await;
    })
    .await?;
    Ok(addr)
}

/// The date hyper or the lean path added, which differs by the second;
/// and the request id the proxy made, which differs by request.
fn without_added_date(answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer).into_owned();
    text.split("\r\n")
        .map(|line| {
            if line.starts_with("x-request-id: ") {
                "x-request-id: (made by the proxy)"
            } else {
                line
            }
        })
        .filter(|line| !line.starts_with("date: ") || line.ends_with("1994 08:49:37 GMT"))
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[tokio::test]
async fn answers_are_byte_for_byte_those_of_hyper() -> TestResult {
    let upstream = scripted_upstream().await?;
    let (_token, proxy) = ready_proxy_to(&format!("http://{upstream}"), &[]).await;
    for (path, _) in ANSWERS {
        let method = if *path == "/head" { "HEAD" } else { "GET" };
        for te in ["TE: trailers\r\n", ""] {
            // Two requests on one connection: the first answer kept alive,
            // the second closing it.
            let head =
                |close: &str| format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{te}{close}");
            // Without a body: the lean path. With an empty chunked one: hyper.
            let lean = format!("{}\r\n{}\r\n", head(""), head("Connection: close\r\n"));
            let chunked = "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
            let hyper = format!(
                "{}{chunked}{}{chunked}",
                head(""),
                head("Connection: close\r\n")
            );
            let mut answers = Vec::new();
            for request in [lean, hyper] {
                let answer = exchange(proxy.addr, request.as_bytes()).await?;
                assert_eq!(
                    String::from_utf8_lossy(&answer)
                        .matches("\r\ndate: ")
                        .count(),
                    2,
                    "{path}: two answers, each with a date: {answer:?}"
                );
                answers.push(without_added_date(&answer));
            }
            assert!(
                answers[0].starts_with("HTTP/1.1 "),
                "{path}: no answer: {:?}",
                answers[0]
            );
            assert_eq!(
                answers[0], answers[1],
                "{path} ({te:?}): the lean path (left) and hyper (right) answered differently"
            );
        }
    }
    Ok(())
}

/// Reads answers from `bytes` one after another (by Content-Length).
fn split_answers(mut bytes: &[u8]) -> Vec<(u16, String)> {
    let mut answers = Vec::new();
    while !bytes.is_empty() {
        let Ok(answer) = RawResponse::parse(bytes) else {
            break;
        };
        let length: usize = answer
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(answer.body.len());
        let body = String::from_utf8_lossy(&answer.body[..length]).into_owned();
        let used = bytes.len() - answer.body.len() + length;
        answers.push((answer.status, body));
        bytes = &bytes[used..];
    }
    answers
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_a_body_goes_to_hyper() -> TestResult {
    let upstream = FakeUpstream::with(|request| {
        Reply::ok(&format!(
            "{} {} {}",
            request.method,
            request.target_str(),
            String::from_utf8_lossy(&request.body)
        ))
    })
    .await;
    let (_token, proxy) = ready_proxy_to(&upstream.url(), &[]).await;

    // Two lean requests, one with a body (hyper takes the connection over
    // with the bytes already read), and one more after it, in one write.
    let bytes = exchange(
        proxy.addr,
        b"GET /one HTTP/1.1\r\nHost: localhost\r\n\r\n\
          GET /two HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n\
          POST /three HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello\
          GET /four HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(
        split_answers(&bytes),
        [
            (200, "GET /one ".to_owned()),
            (200, "GET /two ".to_owned()),
            (200, "POST /three hello".to_owned()),
            (200, "GET /four ".to_owned()),
        ]
    );
    Ok(())
}

/// An upstream that writes `first` (part of an answer, or nothing) and then
/// waits for the proxy to close the connection. The state is 1 once a
/// request has come, 2 once the proxy has closed its connection.
async fn upstream_left_waiting(
    first: &'static [u8],
) -> std::io::Result<(std::net::SocketAddr, Arc<AtomicU8>)> {
    let state = Arc::new(AtomicU8::new(0));
    let seen = Arc::clone(&state);
    let (upstream, _) = raw_upstream(move |mut stream, _head| {
        let seen = Arc::clone(&seen);
        async move {
            let _ = stream.write_all(first).await;
            seen.store(1, Ordering::SeqCst);
            let mut buf = [0u8; 64];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            seen.store(2, Ordering::SeqCst);
        }
    })
    .await?;
    Ok((upstream, state))
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_request_upstream() -> TestResult {
    // Never answers.
    let (upstream, state) = upstream_left_waiting(b"").await?;
    let (_token, proxy) = ready_proxy_to(&format!("http://{upstream}"), &[]).await;

    let mut stream = TcpStream::connect(proxy.addr).await?;
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    until(|| state.load(Ordering::SeqCst) == 1, "the request upstream").await?;
    drop(stream);
    until(
        || state.load(Ordering::SeqCst) == 2,
        "the upstream request to be cancelled",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn on_shutdown_idle_connections_close_and_busy_ones_finish_their_answer() -> TestResult {
    let arrived = Arc::new(AtomicU8::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let (seen, wait) = (Arc::clone(&arrived), Arc::clone(&release));
    // `/slow` is answered when the test says so.
    let (upstream, _) = raw_upstream(move |mut stream, head| {
        let (seen, wait) = (Arc::clone(&seen), Arc::clone(&wait));
        async move {
            if head.starts_with(b"GET /slow") {
                seen.store(1, Ordering::SeqCst);
                wait.notified().await;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndone")
                .await;
        }
    })
    .await?;
    let (_token, proxy) = ready_proxy_to(&format!("http://{upstream}"), &[]).await;

    let mut idle = TcpStream::connect(proxy.addr).await?;
    idle.write_all(b"GET /quick HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut answer = [0u8; 1024];
    let n = idle.read(&mut answer).await?;
    assert!(answer[..n].starts_with(b"HTTP/1.1 200 OK\r\n"));

    let mut busy = TcpStream::connect(proxy.addr).await?;
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    until(
        || arrived.load(Ordering::SeqCst) == 1,
        "the slow request upstream",
    )
    .await?;
    proxy.shutdown.cancel();

    // The idle connection closes at once (the grace is 5 s).
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), idle.read_to_end(&mut rest)).await??;
    assert!(rest.is_empty(), "{rest:?}");
    // The busy one gets its whole answer, told that the connection closes.
    release.notify_one();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(4), busy.read_to_end(&mut bytes)).await??;
    let answer = RawResponse::parse(&bytes)?;
    assert_eq!((answer.status, &answer.body[..]), (200, &b"done"[..]));
    assert_eq!(answer.header("connection"), Some("close"));
    Ok(())
}

#[tokio::test]
async fn the_header_timeout_closes_idle_connections_and_is_not_put_off_by_drips() -> TestResult {
    let (_token, upstream, proxy) =
        ready_proxy(&[("BEARER_PROXY_PROXY_HEADER_TIMEOUT", "300ms")]).await;
    // The answer, then nothing more: the proxy closes the connection.
    let bytes = exchange(proxy.addr, b"GET /once HTTP/1.1\r\nHost: localhost\r\n\r\n").await?;
    assert_eq!(split_answers(&bytes), [(200, "ok".to_owned())]);
    // A head one line at a time, and an idle connection kept busy with
    // empty lines: each line well within the timeout, the whole not.
    for (opening, drip) in [
        (
            &b"GET /drip HTTP/1.1\r\nHost: localhost\r\n"[..],
            &b"X-Drip: 1\r\n"[..],
        ),
        (b"", b"\r\n"),
    ] {
        let mut stream = TcpStream::connect(proxy.addr).await?;
        stream.write_all(opening).await?;
        let started = std::time::Instant::now();
        let mut closed = false;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut byte = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await {
                Ok(Ok(0) | Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(_)) => panic!("the proxy answered a head that never ended"),
                Err(_) => {}
            }
            if stream.write_all(drip).await.is_err() {
                closed = true;
                break;
            }
        }
        assert!(closed, "{drip:?}: still open after {:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // Only the first request reached the upstream.
    assert_eq!(upstream.requests().len(), 1);
    Ok(())
}

#[tokio::test]
async fn odd_requests_after_a_lean_one_are_refused_or_passed_to_hyper() -> TestResult {
    let (_token, upstream, proxy) = ready_proxy(&[]).await;
    // HTTP/2's preface cannot follow an HTTP/1.1 request: the connection
    // closes after the first answer.
    let bytes = exchange(
        proxy.addr,
        b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    )
    .await?;
    assert_eq!(split_answers(&bytes), [(200, "ok".to_owned())]);

    // A repeated Content-Length: 0 reaches the upstream once, as through hyper.
    let answer = raw(
        proxy.addr,
        b"GET /twice HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.last().header_all("content-length"), ["0"]);
    Ok(())
}

#[tokio::test]
async fn a_client_that_leaves_mid_body_frees_the_upstream_connection() -> TestResult {
    // Sends part of the body, then waits for the proxy to go.
    let (upstream, state) =
        upstream_left_waiting(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart").await?;
    let (_token, proxy) = ready_proxy_to(&format!("http://{upstream}"), &[]).await;
    let mut stream = TcpStream::connect(proxy.addr).await?;
    stream
        .write_all(b"GET /part HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut answer = [0u8; 1024];
    let n = stream.read(&mut answer).await?;
    assert!(answer[..n].starts_with(b"HTTP/1.1 200 OK\r\n"));
    drop(stream);
    until(
        || state.load(Ordering::SeqCst) == 2,
        "the upstream connection to be closed",
    )
    .await?;
    Ok(())
}
