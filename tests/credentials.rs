//! Every way of proving who the proxy is: a certificate's signed assertion
//! (checked field by field and verified with the certificate's public
//! key), workload identity's federated token, and managed identity by IMDS
//! and by App Service's endpoint, against loopback fakes that record what
//! went over the wire. Certificates and keys are made by `openssl`, as a
//! person makes them by hand.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{self, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bearer_proxy::config::{Config, Flags};
use bearer_proxy::token::{TokenEndpoint, TokenSource};
use support::pki::{make_pair, openssl, rsa_key, scratch_dir};
use support::*;

type Env = HashMap<String, String>;

/// The certificate's DER and its public key (SubjectPublicKeyInfo DER),
/// as openssl reads them.
fn der_and_public_key(
    dir: &Path,
    crt: &Path,
) -> Result<(Vec<u8>, Vec<u8>), Box<dyn std::error::Error + Send + Sync>> {
    let crt = crt.to_string_lossy();
    openssl(
        dir,
        &["x509", "-in", &crt, "-outform", "DER", "-out", "cert.der"],
    )?;
    openssl(
        dir,
        &["x509", "-in", &crt, "-noout", "-pubkey", "-out", "pub.pem"],
    )?;
    let pem = std::fs::read_to_string(dir.join("pub.pem"))?;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    Ok((std::fs::read(dir.join("cert.der"))?, STANDARD.decode(b64)?))
}

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The endpoint client, as the proxy makes it from `env`.
fn endpoint(env: &Env) -> Result<TokenEndpoint, Box<dyn std::error::Error + Send + Sync>> {
    bearer_proxy::tls::install_crypto_provider();
    let config = Config::load(&Flags::default(), env)?;
    let tls = bearer_proxy::tls::client_config(None)?;
    Ok(TokenEndpoint::new(
        config.token,
        tls,
        &config.upstream.user_agent,
        &config.proxies,
    )?)
}

fn certificate_env(
    token: &FakeTokenEndpoint,
    crt: &Path,
    key: &Path,
    extra: &[(&str, &str)],
) -> Env {
    let mut env = env(&[
        ("API_CLIENT_ID", CLIENT_ID),
        ("API_TOKEN_URL", &token.url()),
        ("API_SCOPE", "api://test-upstream/.default"),
        (
            "BEARER_PROXY_TOKEN_CERTIFICATE_FILE",
            &crt.to_string_lossy(),
        ),
        (
            "BEARER_PROXY_TOKEN_PRIVATE_KEY_FILE",
            &key.to_string_lossy(),
        ),
    ]);
    for (k, v) in extra {
        env.insert((*k).to_owned(), (*v).to_owned());
    }
    env
}

/// A JWT's header and claims, and its signing input and signature.
struct Jwt {
    header: serde_json::Value,
    claims: serde_json::Value,
    signed: String,
    signature: Vec<u8>,
}

fn decode(jwt: &str) -> Result<Jwt, Box<dyn std::error::Error + Send + Sync>> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err(format!("not three parts: {} parts", parts.len()).into());
    };
    Ok(Jwt {
        header: serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header)?)?,
        claims: serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims)?)?,
        signed: format!("{header}.{claims}"),
        signature: URL_SAFE_NO_PAD.decode(signature)?,
    })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Checks one assertion as the fake received it: the form, every header
/// field and claim, and the signature with the certificate's public key.
fn check_assertion(
    request: &TokenRequest,
    token_url: &str,
    alg: &str,
    cert_der: &[u8],
    public_key: &[u8],
) -> Result<Jwt, Box<dyn std::error::Error + Send + Sync>> {
    let form = &request.form;
    assert_eq!(
        form.get("grant_type").map(String::as_str),
        Some("client_credentials")
    );
    assert_eq!(form.get("client_id").map(String::as_str), Some(CLIENT_ID));
    assert_eq!(
        form.get("scope").map(String::as_str),
        Some("api://test-upstream/.default")
    );
    assert_eq!(
        form.get("client_assertion_type").map(String::as_str),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert!(!form.contains_key("client_secret"), "{form:?}");
    assert_eq!(request.authorization, None);
    assert_eq!(form.len(), 5, "{form:?}");
    let jwt = decode(form.get("client_assertion").ok_or("no client_assertion")?)?;

    let header = jwt.header.as_object().ok_or("header")?;
    assert_eq!(header.len(), 3, "{header:?}");
    assert_eq!(jwt.header["alg"], alg);
    assert_eq!(jwt.header["typ"], "JWT");
    if alg == "RS256" {
        let sha1 =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, cert_der);
        assert_eq!(jwt.header["x5t"], URL_SAFE_NO_PAD.encode(sha1.as_ref()));
    } else {
        let sha256 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert_der);
        assert_eq!(
            jwt.header["x5t#S256"],
            URL_SAFE_NO_PAD.encode(sha256.as_ref())
        );
    }

    let claims = jwt.claims.as_object().ok_or("claims")?;
    assert_eq!(claims.len(), 7, "{claims:?}");
    assert_eq!(jwt.claims["aud"], token_url);
    assert_eq!(jwt.claims["iss"], CLIENT_ID);
    assert_eq!(jwt.claims["sub"], CLIENT_ID);
    let jti = jwt.claims["jti"].as_str().ok_or("jti")?;
    let groups: Vec<usize> = jti.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "a GUID: {jti}");
    assert_eq!(&jti[14..15], "4", "a version 4 GUID: {jti}");
    let (nbf, iat, exp) = (
        jwt.claims["nbf"].as_i64().ok_or("nbf")?,
        jwt.claims["iat"].as_i64().ok_or("iat")?,
        jwt.claims["exp"].as_i64().ok_or("exp")?,
    );
    assert!((now() - iat).abs() <= 5, "iat {iat} is now");
    assert_eq!(nbf, iat);
    assert_eq!(exp - nbf, 600, "valid for ten minutes");

    let algorithm: &dyn signature::VerificationAlgorithm = match alg {
        "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
        "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
        "ES256" => &signature::ECDSA_P256_SHA256_FIXED,
        other => return Err(format!("unexpected alg {other}").into()),
    };
    let key = spki_key_bits(public_key)?;
    UnparsedPublicKey::new(algorithm, key)
        .verify(jwt.signed.as_bytes(), &jwt.signature)
        .map_err(|_| format!("the {alg} signature does not verify with the certificate's key"))?;
    Ok(jwt)
}

/// The subjectPublicKey bits of a SubjectPublicKeyInfo (what the
/// verification algorithms take): the BIT STRING after the algorithm.
fn spki_key_bits(spki: &[u8]) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
    fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = data.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            let (bytes, after) = rest.split_at_checked(n)?;
            rest = after;
            bytes.iter().fold(0, |a, b| (a << 8) | usize::from(*b))
        };
        let (content, after) = rest.split_at_checked(len)?;
        Some((tag, content, after))
    }
    let (_, outer, _) = tlv(spki).ok_or("spki")?;
    let (_, _, after_alg) = tlv(outer).ok_or("alg")?;
    let (tag, bits, _) = tlv(after_alg).ok_or("bits")?;
    assert_eq!(tag, 0x03);
    Ok(bits[1..].to_vec())
}

#[tokio::test]
async fn certificate_assertions_carry_every_field_and_verify_with_the_certificate() -> TestResult {
    let dir = scratch_dir()?;
    for (kind, setting, alg) in [
        ("rsa", None, "PS256"),
        ("rsa-pkcs1", Some("RS256"), "RS256"),
        ("rsa", Some("PS256"), "PS256"),
        ("ec", None, "ES256"),
    ] {
        let token = FakeTokenEndpoint::start().await;
        let (crt, key) = make_pair(&dir, &format!("cred-{kind}"), kind)?;
        let mut extra = vec![];
        if let Some(setting) = setting {
            extra.push(("BEARER_PROXY_TOKEN_ASSERTION_ALGORITHM", setting));
        }
        let endpoint = endpoint(&certificate_env(&token, &crt, &key, &extra))?;
        let info = endpoint.credential();
        assert_eq!(info.kind, "certificate");
        assert!(
            info.reason.contains("token.certificate_file"),
            "{}",
            info.reason
        );
        assert!(info.detail.contains(alg), "{}", info.detail);

        endpoint.fetch().await?;
        endpoint.fetch().await?;
        let (der, public_key) = der_and_public_key(&dir, &crt)?;
        let requests = token.requests();
        let first = check_assertion(&requests[0], &token.url(), alg, &der, &public_key)?;
        let second = check_assertion(&requests[1], &token.url(), alg, &der, &public_key)?;
        assert_ne!(
            first.claims["jti"], second.claims["jti"],
            "a new jti each time"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_rotated_certificate_is_used_at_the_next_token_request() -> TestResult {
    let dir = scratch_dir()?;
    let token = FakeTokenEndpoint::start().await;
    let (crt, key) = make_pair(&dir, "rotating", "rsa")?;
    let (old_der, old_key) = der_and_public_key(&dir, &crt)?;
    let endpoint = endpoint(&certificate_env(&token, &crt, &key, &[]))?;
    endpoint.fetch().await?;

    // The files are replaced as a secret mount replaces them: both new.
    let (new_crt, new_key) = make_pair(&dir, "rotated", "rsa")?;
    std::fs::rename(&new_key, &key)?;
    std::fs::rename(&new_crt, &crt)?;
    let (new_der, new_public) = der_and_public_key(&dir, &crt)?;
    assert_ne!(new_der, old_der);
    endpoint.fetch().await?;

    // A half-made rotation (a certificate without its key) is not used:
    // the last good pair signs on.
    let (odd_crt, _) = make_pair(&dir, "odd", "rsa")?;
    std::fs::copy(&odd_crt, &crt)?;
    endpoint.fetch().await?;

    let requests = token.requests();
    check_assertion(&requests[0], &token.url(), "PS256", &old_der, &old_key)?;
    check_assertion(&requests[1], &token.url(), "PS256", &new_der, &new_public)?;
    check_assertion(&requests[2], &token.url(), "PS256", &new_der, &new_public)?;
    Ok(())
}

/// The error `Config::load` gives for `env`.
fn config_error(env: &Env) -> String {
    match Config::load(&Flags::default(), env) {
        Ok(_) => "loaded".to_owned(),
        Err(e) => e.to_string(),
    }
}

/// Writes an rcgen certificate valid between the two dates, with its key.
fn dated_pair(
    dir: &Path,
    name: &str,
    from: (i32, u8, u8),
    to: (i32, u8, u8),
) -> Result<(PathBuf, PathBuf), Box<dyn std::error::Error + Send + Sync>> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
    params.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
    let cert = params.self_signed(&key)?;
    let (crt, key_path) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&crt, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((crt, key_path))
}

#[tokio::test]
async fn certificate_errors_name_both_files_and_what_is_wrong() -> TestResult {
    let dir = scratch_dir()?;
    let token = FakeTokenEndpoint::start().await;
    let both = |e: &str, crt: &Path, key: &Path| {
        assert!(
            e.contains(&*crt.to_string_lossy()) && e.contains(&*key.to_string_lossy()),
            "both files named: {e}"
        );
        assert!(
            e.contains("token.certificate_file") && e.contains("token.private_key_file"),
            "{e}"
        );
    };

    let (crt, key) = dated_pair(&dir, "expired", (2019, 1, 1), (2020, 1, 1))?;
    let e = config_error(&certificate_env(&token, &crt, &key, &[]));
    both(&e, &crt, &key);
    assert!(e.contains("expired on 2020-01-01"), "{e}");

    let (crt, key) = dated_pair(&dir, "future", (2090, 1, 1), (2091, 1, 1))?;
    let e = config_error(&certificate_env(&token, &crt, &key, &[]));
    both(&e, &crt, &key);
    assert!(e.contains("not valid until 2090-01-01"), "{e}");

    let (crt, _) = make_pair(&dir, "one", "rsa")?;
    let (_, other_key) = make_pair(&dir, "two", "rsa")?;
    let e = config_error(&certificate_env(&token, &crt, &other_key, &[]));
    both(&e, &crt, &other_key);
    assert!(e.contains("does not belong to the certificate"), "{e}");

    let (crt, key) = make_pair(&dir, "locked", "rsa")?;
    openssl(
        &dir,
        &[
            "pkcs8",
            "-topk8",
            "-in",
            &key.to_string_lossy(),
            "-v2",
            "aes256",
            "-passout",
            "pass:hunter2",
            "-out",
            "locked-enc.key",
        ],
    )?;
    let encrypted = dir.join("locked-enc.key");
    let e = config_error(&certificate_env(&token, &crt, &encrypted, &[]));
    assert!(e.contains(&*encrypted.to_string_lossy()), "{e}");
    assert!(
        e.contains("is encrypted") && e.contains("openssl pkey -in"),
        "{e}"
    );
    openssl(
        &dir,
        &[
            "rsa",
            "-in",
            &key.to_string_lossy(),
            "-aes256",
            "-traditional",
            "-passout",
            "pass:hunter2",
            "-out",
            "locked-trad.key",
        ],
    )?;
    let e = config_error(&certificate_env(
        &token,
        &crt,
        &dir.join("locked-trad.key"),
        &[],
    ));
    assert!(e.contains("is encrypted"), "{e}");

    let (crt, key) = make_pair(&dir, "ec-alg", "ec")?;
    let e = config_error(&certificate_env(
        &token,
        &crt,
        &key,
        &[("BEARER_PROXY_TOKEN_ASSERTION_ALGORITHM", "RS256")],
    ));
    assert!(
        e.contains("token.assertion_algorithm")
            && e.contains("RS256")
            && e.contains("EC P-256")
            && e.contains("ES256"),
        "{e}"
    );

    let mut env = certificate_env(&token, &crt, &key, &[]);
    env.remove("BEARER_PROXY_TOKEN_PRIVATE_KEY_FILE");
    let e = config_error(&env);
    assert!(e.contains("token.private_key_file is not set"), "{e}");

    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "hello")?;
    let e = config_error(&certificate_env(&token, &not_pem, &key, &[]));
    assert!(e.contains("holds no PEM certificate"), "{e}");
    let e = config_error(&certificate_env(&token, &crt, &not_pem, &[]));
    assert!(e.contains("holds no PEM private key"), "{e}");
    let e = config_error(&certificate_env(
        &token,
        &dir.join("missing.crt"),
        &key,
        &[],
    ));
    assert!(
        e.contains("cannot read") && e.contains("missing.crt"),
        "{e}"
    );
    Ok(())
}

#[tokio::test]
async fn certificates_without_v3_extensions_are_accepted_for_both_uses() -> TestResult {
    // What `openssl x509 -req` makes without an extensions file: version 1.
    let dir = scratch_dir()?;
    rsa_key(&dir, "v1.key")?;
    openssl(
        &dir,
        &[
            "req", "-new", "-key", "v1.key", "-subj", "/CN=v1", "-out", "v1.csr",
        ],
    )?;
    openssl(
        &dir,
        &[
            "x509", "-req", "-in", "v1.csr", "-signkey", "v1.key", "-days", "30", "-out", "v1.crt",
        ],
    )?;
    let (crt, key) = (dir.join("v1.crt"), dir.join("v1.key"));

    let token = FakeTokenEndpoint::start().await;
    let endpoint = endpoint(&certificate_env(&token, &crt, &key, &[]))?;
    let version = endpoint
        .certificate()
        .map(|c| c.identity().version)
        .ok_or("no certificate")?;
    assert_eq!(version, 1, "openssl made a version 1 certificate");
    endpoint.fetch().await?;
    let (der, public_key) = der_and_public_key(&dir, &crt)?;
    check_assertion(
        &token.requests()[0],
        &token.url(),
        "PS256",
        &der,
        &public_key,
    )?;

    let mut env = env_for(&token, "https://api.example", &[]);
    env.insert(
        "BEARER_PROXY_UPSTREAM_CLIENT_CERT_FILE".into(),
        crt.to_string_lossy().into(),
    );
    env.insert(
        "BEARER_PROXY_UPSTREAM_CLIENT_KEY_FILE".into(),
        key.to_string_lossy().into(),
    );
    Config::load(&Flags::default(), &env)?;
    Ok(())
}

// ------------------------------------------------------------ workload identity

#[tokio::test]
async fn workload_identity_is_chosen_by_the_azure_variables_and_reads_the_file_afresh() -> TestResult
{
    let dir = scratch_dir()?;
    let file = dir.join("azure-identity-token");
    std::fs::write(&file, "eyJfederated.first.token\n")?;
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::start().await;
    let authority = format!("http://{}", token.addr);
    let file_name = file.to_string_lossy().into_owned();
    // As the webhook sets them; no API_* credential at all.
    let azure = [
        ("API_TOKEN_URL", ""),
        ("API_CLIENT_ID", ""),
        ("API_CLIENT_SECRET", ""),
        ("AZURE_FEDERATED_TOKEN_FILE", file_name.as_str()),
        ("AZURE_CLIENT_ID", "azure-client-id"),
        ("AZURE_TENANT_ID", "test-tenant"),
        ("AZURE_AUTHORITY_HOST", authority.as_str()),
    ];
    let proxy = start_proxy(&token, &upstream.url(), &azure).await;
    wait_ready(&proxy).await;
    let answer = http1().get(proxy.url("/data")).send().await?;
    assert_eq!(answer.status(), 200);
    assert_eq!(upstream.last().bearer(), "token-1");

    let request = &token.requests()[0];
    assert_eq!(request.path, "/test-tenant/oauth2/v2.0/token");
    let form = &request.form;
    assert_eq!(
        form.get("client_assertion").map(String::as_str),
        Some("eyJfederated.first.token")
    );
    assert_eq!(
        form.get("client_assertion_type").map(String::as_str),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert_eq!(
        form.get("client_id").map(String::as_str),
        Some("azure-client-id")
    );
    assert_eq!(
        form.get("grant_type").map(String::as_str),
        Some("client_credentials")
    );
    assert!(!form.contains_key("client_secret"));
    assert_eq!(request.authorization, None);

    let status = proxy.status().await?;
    assert_eq!(status["credential"]["kind"], "workload_identity");
    let chosen = status["credential"]["chosen_by"]
        .as_str()
        .unwrap_or_default();
    assert!(
        chosen.contains("AZURE_FEDERATED_TOKEN_FILE") && chosen.contains("AZURE_CLIENT_ID"),
        "{chosen}"
    );
    assert!(!status.to_string().contains("eyJfederated"), "{status}");

    // Kubernetes rotates the file: the next request reads the new token.
    let endpoint = endpoint(&env_for(&token, &upstream.url(), &azure))?;
    std::fs::write(&file, "eyJfederated.second.token")?;
    endpoint.fetch().await?;
    let last = token.requests().pop().ok_or("no request")?;
    assert_eq!(
        last.form.get("client_assertion").map(String::as_str),
        Some("eyJfederated.second.token")
    );

    // An empty file is a clear error that names it.
    std::fs::write(&file, "")?;
    let e = endpoint
        .fetch()
        .await
        .err()
        .ok_or("an empty file gave a token")?;
    assert!(
        e.to_string().contains("is empty") && e.to_string().contains(&file_name),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_given_client_secret_wins_over_the_workload_identity_variables_and_says_so() -> TestResult {
    let e = env(&[
        ("API_CLIENT_ID", CLIENT_ID),
        ("API_CLIENT_SECRET", CLIENT_SECRET),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            "/var/run/secrets/azure/tokens/azure-identity-token",
        ),
        ("AZURE_CLIENT_ID", "azure-client-id"),
        ("AZURE_TENANT_ID", "azure-tenant"),
    ]);
    let config = Config::load(&Flags::default(), &e)?;
    assert_eq!(config.token.credential.kind(), "client_secret");
    let reason = &config.token.credential_reason;
    assert!(
        reason.contains("API_CLIENT_SECRET")
            && reason.contains("AZURE_FEDERATED_TOKEN_FILE")
            && reason.contains("workload_identity"),
        "{reason}"
    );
    // The secret's own settings are untouched by the Azure variables.
    assert!(
        config
            .token
            .url
            .as_str()
            .contains("efa98c7b-2114-46e8-be99-954a4f1a2d9c"),
        "{}",
        config.token.url
    );
    assert_eq!(config.token.client_id.as_deref(), Some(CLIENT_ID));

    // Chosen explicitly, the file must exist.
    let mut e = e.clone();
    e.insert(
        "BEARER_PROXY_TOKEN_CREDENTIAL".into(),
        "workload_identity".into(),
    );
    let error = config_error(&e);
    assert!(
        error.contains("token.federated_token_file (set by AZURE_FEDERATED_TOKEN_FILE)")
            && error.contains("cannot read"),
        "{error}"
    );
    Ok(())
}

// ------------------------------------------------------------ managed identity

#[tokio::test]
async fn managed_identity_from_imds_retries_as_imds_asks_and_never_goes_through_a_proxy()
-> TestResult {
    // IMDS's answer: every number a string.
    let expires_on = (now() + 86_399).to_string();
    let body = serde_json::json!({
        "access_token": "imds-token",
        "client_id": "user-assigned-id",
        "expires_in": "86399",
        "expires_on": expires_on,
        "ext_expires_in": "86399",
        "not_before": now().to_string(),
        "resource": "api://test-upstream",
        "token_type": "Bearer",
    });
    let imds = FakeIdentity::start(body.to_string()).await?;
    // 404 while IMDS is updating, 429 with Retry-After, a 500: retried.
    imds.script
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend([
            (404, "{\"error\":\"not_found\"}".to_owned(), vec![]),
            (
                429,
                "{\"error\":\"too_many_requests\"}".to_owned(),
                vec![("retry-after", "0")],
            ),
            (
                500,
                "{\"error\":\"unknown_error\",\"error_description\":\"IMDS is restarting\"}"
                    .to_owned(),
                vec![],
            ),
        ]);
    let (_, closed) = closed_port()?;
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::start().await;
    let endpoint_url = format!("http://{}/metadata/identity/oauth2/token", imds.addr);
    let proxy_url = format!("http://{closed}");
    let proxy = start_proxy(
        &token,
        &upstream.url(),
        &[
            ("API_CLIENT_SECRET", ""),
            ("API_CLIENT_ID", ""),
            ("AZURE_CLIENT_ID", "user-assigned-id"),
            ("BEARER_PROXY_TOKEN_CREDENTIAL", "managed_identity"),
            (
                "BEARER_PROXY_TOKEN_MANAGED_IDENTITY_ENDPOINT",
                &endpoint_url,
            ),
            ("BEARER_PROXY_TOKEN_RETRY_INITIAL", "20ms"),
            ("BEARER_PROXY_TOKEN_RETRY_MAX", "100ms"),
            ("HTTP_PROXY", &proxy_url),
            ("HTTPS_PROXY", &proxy_url),
        ],
    )
    .await;
    // Ready: the token came from IMDS, though every request through the
    // forward proxy (a closed port) would have failed.
    wait_ready(&proxy).await;
    assert_eq!(token.count(), 0, "nothing went to the OAuth2 endpoint");

    let requests = imds.requests();
    assert_eq!(requests.len(), 4, "three failures retried, then the token");
    for request in &requests {
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/metadata/identity/oauth2/token");
        assert_eq!(
            request.headers.get("metadata").map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        assert!(request.headers.get("x-identity-header").is_none());
        let q = &request.query;
        assert_eq!(q.get("api-version").map(String::as_str), Some("2018-02-01"));
        assert_eq!(
            q.get("resource").map(String::as_str),
            Some("api://test-upstream")
        );
        assert_eq!(
            q.get("client_id").map(String::as_str),
            Some("user-assigned-id")
        );
        assert_eq!(q.len(), 3, "{q:?}");
    }
    let status = proxy.status().await?;
    assert_eq!(status["credential"]["kind"], "managed_identity");
    assert!(
        status["credential"]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("user-assigned identity user-assigned-id"),
        "{status}"
    );
    assert_eq!(status["token"]["consecutive_failures"], 0);
    Ok(())
}

#[tokio::test]
async fn managed_identity_on_app_service_sends_its_header_and_reads_expires_on() -> TestResult {
    let expires_on = (now() + 3600).to_string();
    let body = serde_json::json!({
        "access_token": "app-service-token",
        "expires_on": expires_on,
        "resource": "api://test-upstream",
        "token_type": "Bearer",
        "client_id": "system-assigned",
    });
    let identity = FakeIdentity::start(body.to_string()).await?;
    let token = FakeTokenEndpoint::start().await;
    let upstream = FakeUpstream::start().await;
    let endpoint_url = format!("http://{}/msi/token", identity.addr);
    let header = "b4f6c5e2-identity-header-value";
    let settings = [
        ("API_CLIENT_SECRET", ""),
        ("API_CLIENT_ID", ""),
        ("BEARER_PROXY_TOKEN_CREDENTIAL", "managed_identity"),
        ("IDENTITY_ENDPOINT", endpoint_url.as_str()),
        ("IDENTITY_HEADER", header),
    ];
    let proxy = start_proxy(&token, &upstream.url(), &settings).await;
    wait_ready(&proxy).await;
    assert_eq!(http1().get(proxy.url("/data")).send().await?.status(), 200);
    assert_eq!(upstream.last().bearer(), "app-service-token");

    let request = &identity.requests()[0];
    assert_eq!(request.path, "/msi/token");
    assert_eq!(
        request
            .headers
            .get("x-identity-header")
            .map(|v| v.as_bytes()),
        Some(header.as_bytes())
    );
    assert!(request.headers.get("metadata").is_none());
    assert_eq!(
        request.query.get("api-version").map(String::as_str),
        Some("2019-08-01")
    );
    assert_eq!(
        request.query.get("resource").map(String::as_str),
        Some("api://test-upstream")
    );
    assert!(
        !request.query.contains_key("client_id"),
        "system-assigned: no client id"
    );

    let status = proxy.status().await?;
    let expires_in = status["token"]["expires_in_s"].as_u64().unwrap_or_default();
    assert!(
        (3500..=3600).contains(&expires_in),
        "from expires_on: {status}"
    );
    assert!(!status.to_string().contains(header), "{status}");

    // Half of the pair is an error naming the other.
    let mut e = env_for(&token, &upstream.url(), &settings);
    e.remove("IDENTITY_HEADER");
    let error = config_error(&e);
    assert!(
        error.contains("IDENTITY_ENDPOINT is set but IDENTITY_HEADER is not"),
        "{error}"
    );
    let mut e = env_for(&token, &upstream.url(), &settings);
    e.remove("IDENTITY_ENDPOINT");
    let error = config_error(&e);
    assert!(
        error.contains("IDENTITY_HEADER is set but IDENTITY_ENDPOINT is not"),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn a_managed_identity_error_is_reported_with_its_words() -> TestResult {
    let imds = FakeIdentity::start(String::new()).await?;
    let endpoint_url = format!("http://{}/metadata/identity/oauth2/token", imds.addr);
    imds.script
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push_back((
            400,
            r#"{"error":"invalid_request","error_description":"Identity not found"}"#.to_owned(),
            vec![],
        ));
    let e = env(&[
        ("BEARER_PROXY_TOKEN_CREDENTIAL", "managed_identity"),
        (
            "BEARER_PROXY_TOKEN_MANAGED_IDENTITY_ENDPOINT",
            &endpoint_url,
        ),
        ("API_SCOPE", "api://test-upstream/.default"),
    ]);
    let error = endpoint(&e)?
        .fetch()
        .await
        .err()
        .ok_or("a token from a 400")?;
    assert_eq!(error.code(), "invalid_request");
    assert!(
        error.to_string().contains("HTTP 400 invalid_request"),
        "{error}"
    );

    // A managed identity needs a resource.
    let mut e = e.clone();
    e.insert("API_SCOPE".into(), "none".into());
    assert!(config_error(&e).contains("managed identity asks for a token for a resource"));
    Ok(())
}

#[test]
fn an_unknown_credential_kind_names_the_choices() {
    let e = config_error(&env(&[
        ("API_CLIENT_ID", CLIENT_ID),
        ("API_CLIENT_SECRET", CLIENT_SECRET),
        ("BEARER_PROXY_TOKEN_CREDENTIAL", "password"),
    ]));
    assert!(
        e.contains("token.credential (set by BEARER_PROXY_TOKEN_CREDENTIAL)")
            && e.contains("client_secret, certificate, workload_identity or managed_identity"),
        "{e}"
    );
}

#[tokio::test]
async fn no_credential_material_reaches_check_or_status() -> TestResult {
    let dir = scratch_dir()?;
    let token = FakeTokenEndpoint::start().await;
    let (crt, key) = make_pair(&dir, "quiet", "rsa")?;
    let env = certificate_env(&token, &crt, &key, &[]);
    let config = Config::load(&Flags::default(), &env)?;
    let report = bearer_proxy::check::run(&config).await;
    let text = format!("{}{}", report.text(), report.json());
    assert!(
        text.contains("certificate:") && text.contains("thumbprint"),
        "{text}"
    );
    assert!(!text.contains("eyJ"), "no JWT in check's output: {text}");
    let key_pem = std::fs::read_to_string(&key)?;
    let key_line = key_pem.lines().nth(1).unwrap_or("x");
    assert!(!text.contains(key_line));
    Ok(())
}

#[tokio::test]
async fn every_key_rustls_presents_still_serves_mtls_and_only_assertion_keys_sign() -> TestResult {
    let dir = scratch_dir()?;
    let token = FakeTokenEndpoint::start().await;
    for (name, genpkey) in [
        (
            "ed25519",
            vec!["genpkey", "-algorithm", "ED25519", "-out", "ed25519.key"],
        ),
        (
            "p521",
            vec![
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-521",
                "-out",
                "p521.key",
            ],
        ),
    ] {
        openssl(&dir, &genpkey)?;
        let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
        openssl(
            &dir,
            &[
                "req", "-x509", "-new", "-key", &key, "-subj", "/CN=k", "-days", "30", "-out", &crt,
            ],
        )?;
        let (crt, key) = (dir.join(crt), dir.join(key));
        let mut env = env_for(&token, "https://api.example", &[]);
        env.insert(
            "BEARER_PROXY_UPSTREAM_CLIENT_CERT_FILE".into(),
            crt.to_string_lossy().into(),
        );
        env.insert(
            "BEARER_PROXY_UPSTREAM_CLIENT_KEY_FILE".into(),
            key.to_string_lossy().into(),
        );
        Config::load(&Flags::default(), &env).map_err(|e| format!("{name} for mTLS: {e}"))?;
        let e = config_error(&certificate_env(&token, &crt, &key, &[]));
        assert!(
            e.contains("cannot sign an assertion") && e.contains(&*key.to_string_lossy()),
            "{name}: {e}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_certificate_from_before_1970_is_an_error_not_a_panic() -> TestResult {
    let dir = scratch_dir()?;
    let token = FakeTokenEndpoint::start().await;
    let (crt, key) = dated_pair(&dir, "ancient", (1955, 1, 1), (1969, 6, 1))?;
    let e = config_error(&certificate_env(&token, &crt, &key, &[]));
    assert!(e.contains("expired on") && e.contains("(Unix time)"), "{e}");
    Ok(())
}

#[test]
fn workload_identity_needs_all_three_azure_variables_and_says_which_is_missing() {
    let file = "/var/run/secrets/azure/tokens/azure-identity-token";
    let e = config_error(&env(&[
        ("AZURE_FEDERATED_TOKEN_FILE", file),
        ("AZURE_TENANT_ID", "tenant"),
    ]));
    assert!(
        e.contains("AZURE_FEDERATED_TOKEN_FILE is set but no client id is")
            && e.contains("AZURE_CLIENT_ID"),
        "{e}"
    );
    let e = config_error(&env(&[
        ("AZURE_FEDERATED_TOKEN_FILE", file),
        ("AZURE_CLIENT_ID", "client"),
    ]));
    assert!(
        e.contains("AZURE_FEDERATED_TOKEN_FILE is set but no tenant is")
            && e.contains("AZURE_TENANT_ID"),
        "{e}"
    );
}

#[tokio::test]
async fn credentials_given_and_not_used_are_named() -> TestResult {
    let dir = scratch_dir()?;
    let (crt, key) = make_pair(&dir, "unused", "rsa")?;
    let config = Config::load(
        &Flags::default(),
        &env(&[
            ("API_CLIENT_ID", CLIENT_ID),
            ("API_CLIENT_SECRET", CLIENT_SECRET),
            (
                "BEARER_PROXY_TOKEN_CERTIFICATE_FILE",
                &crt.to_string_lossy(),
            ),
            (
                "BEARER_PROXY_TOKEN_PRIVATE_KEY_FILE",
                &key.to_string_lossy(),
            ),
        ]),
    )?;
    assert_eq!(config.token.credential.kind(), "client_secret");
    let reason = &config.token.credential_reason;
    assert!(
        reason.contains("token.certificate_file") && reason.contains("not used"),
        "{reason}"
    );
    Ok(())
}

#[test]
fn an_identity_header_that_a_header_cannot_carry_is_a_config_error_that_hides_it() {
    let e = config_error(&env(&[
        ("BEARER_PROXY_TOKEN_CREDENTIAL", "managed_identity"),
        ("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi/token"),
        ("IDENTITY_HEADER", "hidden\u{7f}value"),
    ]));
    assert!(
        e.contains("IDENTITY_HEADER") && !e.contains("hidden"),
        "{e}"
    );
}
