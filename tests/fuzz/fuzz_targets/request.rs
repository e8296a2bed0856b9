//! Fuzzes what the proxy does with a request before forwarding it: the
//! guard's checks, header cleaning, path normalisation, Location rewriting
//! and token masking, on arbitrary bytes parsed as an HTTP/1.1 request.
//! Run by `tests/fuzz/run.sh`.
#![no_main]

use bearer_proxy::config::{GuardConfig, UpstreamUrl};
use bearer_proxy::guard::{Guard, has_dot_segment};
use bearer_proxy::proxy::headers::{LocationRewriter, clean_request, clean_response};
use bearer_proxy::proxy::{mask, normalize_path};
use bearer_proxy::secret::LocalKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(data) else {
        // Not a request head: still feed the byte-level helpers.
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = normalize_path(text);
            let _ = has_dot_segment(text);
        }
        assert_masked(data);
        return;
    };
    let mut builder = http::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"));
    for header in parsed.headers.iter() {
        builder = builder.header(header.name, header.value);
    }
    let Ok(request) = builder.body(()) else { return };

    let plain = Guard::new(&GuardConfig::default(), "127.0.0.1:8080".parse().ok());
    let strict = Guard::new(
        &GuardConfig {
            allowed_hosts: vec!["bearer-proxy".into(), "api:8443".into()],
            allowed_origins: vec!["https://app.example.com".into()],
            local_key: Some(LocalKey::new("0123456789abcdef")),
        },
        "0.0.0.0:8080".parse().ok(),
    );
    // Whatever a guard accepts has no dot-segment and carries its key.
    for guard in [&plain, &strict] {
        if guard.check(&request).is_ok() {
            assert!(!has_dot_segment(request.uri().path()));
            assert_ne!(request.method(), http::Method::CONNECT);
            assert_ne!(request.method(), http::Method::TRACE);
        }
    }
    if strict.check(&request).is_ok() {
        assert_eq!(request.headers().get("x-proxy-key").map(|v| v.as_bytes()), Some(&b"0123456789abcdef"[..]));
    }
    let _ = normalize_path(request.uri().path());
    assert_masked(data);

    let mut cleaned = request.headers().clone();
    clean_request(&mut cleaned);
    assert!(!cleaned.contains_key(http::header::CONNECTION));
    assert!(!cleaned.contains_key("x-proxy-key"));
    let mut response = request.headers().clone();
    clean_response(&mut response);

    let upstream = UpstreamUrl {
        scheme: http::uri::Scheme::HTTPS,
        authority: http::uri::Authority::from_static("api.example.com"),
        base_path: "/v1".into(),
    };
    let rewriter = LocationRewriter::new(&upstream);
    for value in request.headers().values() {
        if let Ok(text) = value.to_str()
            && let Some(rewritten) = rewriter.rewrite(text)
        {
            assert!(rewritten.starts_with('/'));
        }
    }
});

/// The token never survives masking, whatever the body.
fn assert_masked(data: &[u8]) {
    let masked = mask(&bytes::Bytes::copy_from_slice(data), "tok-en");
    assert!(!masked.windows(6).any(|w| w == b"tok-en"), "the token survived masking");
}
