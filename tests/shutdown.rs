//! Graceful shutdown: not ready at once, no new connections, in-flight
//! requests finish, then `run` returns.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn shutdown_drains_a_request_in_flight() -> TestResult {
    let upstream = FakeUpstream::with(|_| {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let _ = tx.send(b"slow ".to_vec()).await;
            tokio::time::sleep(Duration::from_millis(600)).await;
            let _ = tx.send(b"answer".to_vec()).await;
        });
        Reply::with_body(Body::Stream(rx))
    })
    .await;
    let (_token, proxy) = ready_proxy_to(&upstream.url(), &[]).await;

    let client = http1();
    let in_flight = tokio::spawn(client.get(proxy.url("/slow")).send());
    for _ in 0..200 {
        if !upstream.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.shutdown.cancel();
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(proxy.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(refused, "the listener stopped accepting");

    let readyz = http1().get(proxy.admin_url("/readyz")).send().await?;
    assert_eq!(readyz.status(), 503);
    let body: serde_json::Value = readyz.json().await?;
    assert_eq!(body["reason"], "shutting down");

    let response = in_flight.await??;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await?, "slow answer");
    tokio::time::timeout(Duration::from_secs(5), proxy.task).await???;
    Ok(())
}
