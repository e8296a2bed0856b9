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

/// An HTTPS upstream whose TLS handshake takes `delay` (as one across a
/// slow network does): counts handshakes done, answers 200 "ok" to every
/// request on a connection.
async fn slow_tls_upstream(
    pki: &support::pki::Pki,
    delay: std::time::Duration,
    handshakes: Arc<AtomicU32>,
) -> Result<std::net::SocketAddr, Box<dyn std::error::Error + Send + Sync>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let certs =
        CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes())?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, handshakes) = (acceptor.clone(), Arc::clone(&handshakes));
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                handshakes.fetch_add(1, Ordering::SeqCst);
                let mut tls = BufReader::new(tls);
                loop {
                    let mut line = String::new();
                    match tls.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if tls.get_mut().write_all(answer).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    Ok(addr)
}

#[tokio::test]
async fn readiness_waits_for_the_warm_tls_connection_which_the_first_request_takes() -> TestResult {
    bearer_proxy::tls::install_crypto_provider();
    let pki = support::pki::Pki::new()?;
    let ca = pki.write_ca()?;
    let handshakes = Arc::new(AtomicU32::new(0));
    let addr = slow_tls_upstream(
        &pki,
        std::time::Duration::from_millis(300),
        Arc::clone(&handshakes),
    )
    .await?;
    let ca = ca.to_string_lossy().into_owned();
    let (_token, proxy) = ready_proxy_to(
        &format!("https://localhost:{}", addr.port()),
        &[("BEARER_PROXY_TLS_CA_FILE", &ca)],
    )
    .await;
    // Ready only once the handshake is done: the token came at once.
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);
    for _ in 0..3 {
        let answer = http1().get(proxy.url("/x")).send().await?;
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.text().await?, "ok");
    }
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        1,
        "the requests took the warm connection"
    );
    Ok(())
}
