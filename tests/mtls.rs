//! A client certificate to the upstream: refused without one, served with
//! it, and the new one presented after the files are replaced on disk.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;

use bearer_proxy::config::{Config, Flags};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use support::pki::{Identity, Pki, TlsServer, scratch_dir};
use support::*;

/// The last 16 bytes of a certificate's DER (its signature), hex: tells
/// one certificate from another.
fn fingerprint(der: &[u8]) -> String {
    der[der.len().saturating_sub(16)..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn fingerprint_pem(pem: &str) -> String {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .map(|c| fingerprint(&c))
        .unwrap_or_default()
}

/// An HTTPS upstream that requires a client certificate from the CA and
/// answers with its fingerprint; one request per connection.
async fn mtls_upstream(pki: &Pki) -> Result<SocketAddr, Box<dyn std::error::Error + Send + Sync>> {
    TlsServer {
        alpn: &[],
        require_client_cert: true,
    }
    .serve(pki, |tls| async move {
        let presented = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| fingerprint(c))
            .unwrap_or_default();
        let service = hyper::service::service_fn(move |_: hyper::Request<Incoming>| {
            let body = presented.clone();
            async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body)))) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .serve_connection(TokioIo::new(tls), service)
            .await;
    })
    .await
}

fn write_identity(dir: &std::path::Path, identity: &Identity) -> std::io::Result<(String, String)> {
    // Written aside and renamed in, as a secret-rotation tool does.
    let (cert, key) = (dir.join("client.pem"), dir.join("client.key"));
    std::fs::write(dir.join("client.pem.new"), &identity.cert_pem)?;
    std::fs::write(dir.join("client.key.new"), &identity.key_pem)?;
    std::fs::rename(dir.join("client.key.new"), &key)?;
    std::fs::rename(dir.join("client.pem.new"), &cert)?;
    Ok((cert.display().to_string(), key.display().to_string()))
}

#[tokio::test]
async fn a_client_certificate_is_presented_and_reloaded_when_replaced() -> TestResult {
    let pki = Pki::new()?;
    let addr = mtls_upstream(&pki).await?;
    let upstream = format!("https://localhost:{}", addr.port());
    let ca = pki.write_ca()?;
    let ca = ca.to_str().unwrap_or_default();
    let token = FakeTokenEndpoint::start().await;

    // Without a client certificate: 502.
    let proxy = start_proxy(&token, &upstream, &[("BEARER_PROXY_TLS_CA_FILE", ca)]).await;
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_proxy_error(&response, 502, "upstream_unreachable");

    // With one: served, and the upstream saw that certificate.
    let dir = scratch_dir()?;
    let first = pki.client("client-one")?;
    let (cert, key) = write_identity(&dir, &first)?;
    let settings = [
        ("BEARER_PROXY_TLS_CA_FILE", ca),
        ("BEARER_PROXY_UPSTREAM_CLIENT_CERT_FILE", cert.as_str()),
        ("BEARER_PROXY_UPSTREAM_CLIENT_KEY_FILE", key.as_str()),
    ];
    let proxy = start_proxy(&token, &upstream, &settings).await;
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await?, fingerprint_pem(&first.cert_pem));

    // Replaced on disk: the next connection presents the new one.
    let second = pki.client("client-two")?;
    write_identity(&dir, &second)?;
    // The files are looked at no more than once a second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await?,
        fingerprint_pem(&second.cert_pem),
        "no restart needed"
    );

    // A mismatched pair (a new key renamed in) keeps the previous one in use.
    std::fs::write(dir.join("client.key.new"), pki.client("other")?.key_pem)?;
    std::fs::rename(dir.join("client.key.new"), dir.join("client.key"))?;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let response = http1().get(proxy.url("/x")).send().await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await?, fingerprint_pem(&second.cert_pem));
    Ok(())
}

#[tokio::test]
async fn a_missing_or_mismatched_pair_is_a_config_error_naming_both_files() -> TestResult {
    let pki = Pki::new()?;
    let dir = scratch_dir()?;
    let one = pki.client("one")?;
    let (cert, _key) = write_identity(&dir, &one)?;
    let other_key = dir.join("other.key");
    std::fs::write(&other_key, pki.client("two")?.key_pem)?;
    let other_key = other_key.display().to_string();
    let base = [("API_CLIENT_ID", "a"), ("API_CLIENT_SECRET", "b")];

    let mut env = base.to_vec();
    env.push(("BEARER_PROXY_UPSTREAM_CLIENT_CERT_FILE", &cert));
    let error = Config::load(&Flags::default(), &env[..])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        error.contains("upstream.client_cert_file")
            && error.contains("upstream.client_key_file")
            && error.contains("together"),
        "{error}"
    );

    env.push(("BEARER_PROXY_UPSTREAM_CLIENT_KEY_FILE", &other_key));
    let error = Config::load(&Flags::default(), &env[..])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        error.contains("upstream.client_cert_file") && error.contains("upstream.client_key_file"),
        "{error}"
    );
    assert!(error.contains("does not belong"), "{error}");
    Ok(())
}
