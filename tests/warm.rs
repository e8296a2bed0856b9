//! A connection to the upstream kept ready: opened at start, before any
//! request; replaced ahead of need when the upstream
//! closes it; none with `upstream.keep_warm = false`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

#[tokio::test]
async fn a_connection_is_ready_before_the_first_request_and_serves_the_next_ones() -> TestResult {
    let (_token, upstream, proxy) = ready_proxy(&[]).await;
    until(|| upstream.connections() == 1, "a warm connection").await?;
    assert!(
        upstream.requests().is_empty(),
        "no request was needed for it"
    );
    // Clients that open a connection per request, one after another.
    for i in 0..5 {
        let client = http1();
        let answer = client.get(proxy.url(&format!("/item/{i}"))).send().await?;
        assert_eq!(answer.status(), 200);
    }
    assert_eq!(upstream.requests().len(), 5);
    assert_eq!(
        upstream.connections(),
        1,
        "every request went on the warm connection"
    );
    Ok(())
}

#[tokio::test]
async fn a_warm_connection_the_upstream_closes_is_replaced_ahead_of_need() -> TestResult {
    // An upstream that closes its first two connections at once, as one
    // with a short idle limit does, and keeps the third.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accepted = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            if n > 2 {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while matches!(stream.read(&mut buf).await, Ok(read) if read > 0) {}
                });
            }
        }
    });
    let (_token, _proxy) = ready_proxy_to(&format!("http://{addr}"), &[]).await;
    until(|| accepted.load(Ordering::SeqCst) >= 3, "two replacements").await?;
    Ok(())
}

#[tokio::test]
async fn no_connection_is_opened_ahead_with_keep_warm_off() -> TestResult {
    let (_token, upstream, proxy) =
        ready_proxy(&[("BEARER_PROXY_UPSTREAM_KEEP_WARM", "false")]).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(upstream.connections(), 0);
    assert_eq!(http1().get(proxy.url("/x")).send().await?.status(), 200);
    assert_eq!(upstream.connections(), 1);
    Ok(())
}

#[tokio::test]
async fn an_unreachable_upstream_does_not_hold_readiness_back() -> TestResult {
    // Readiness waits for the first attempt at a warm connection, not for
    // its success.
    let (_held, closed) = closed_port()?;
    let (_token, proxy) = ready_proxy_to(&format!("http://{closed}"), &[]).await;
    let answer = http1().get(proxy.url("/x")).send().await?;
    assert_eq!(answer.status(), 502);
    Ok(())
}
