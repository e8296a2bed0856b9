//! End to end against an authorization server nobody here wrote: panva's
//! `oidc-provider` (npm, `tests/clients/oidc_provider`), with clients that
//! prove themselves by `private_key_jwt` (the proxy's certificate and key:
//! PS256, RS256 and ES256) and by `client_secret_basic`. The proxy gets
//! client-credentials tokens from it, an upstream receives them, and the
//! server's own introspection says that each token is real and whose.
//!
//! `.ci/run` installs it (`npm ci`); elsewhere the test is skipped with a
//! notice unless `CI` is set. The server's log (stderr) says why it refused
//! an assertion, when it does.

mod support;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::pki::{make_pair, scratch_dir};
use support::*;

const SCOPE: &str = "api.read";
const BASIC_SECRET: &str = "oidc-provider-basic-secret-0123456789";

struct Server {
    _process: Daemon,
    token_endpoint: String,
    introspection_endpoint: String,
}

fn server_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/oidc_provider")
}

/// Starts oidc-provider with `clients`; `None` (skipped) where it is not
/// installed and `CI` is not set.
fn start(
    dir: &Path,
    clients: serde_json::Value,
) -> Result<Option<Server>, Box<dyn std::error::Error + Send + Sync>> {
    let installed = server_dir().join("node_modules/oidc-provider").is_dir();
    if !installed {
        if std::env::var_os("CI").is_some() {
            return Err("oidc-provider is not installed: .ci/run installs it (npm ci in tests/clients/oidc_provider)".into());
        }
        eprintln!(
            "skipped: oidc-provider is not installed (cd tests/clients/oidc_provider && npm ci)"
        );
        return Ok(None);
    }
    let config = dir.join("oidc-provider.json");
    std::fs::write(
        &config,
        serde_json::json!({ "scope": SCOPE, "clients": clients }).to_string(),
    )?;
    let mut process = Daemon::spawn(
        Command::new("node")
            .arg(server_dir().join("server.mjs"))
            .arg(&config)
            .stdout(Stdio::piped()),
    )?;
    let stdout = process.stdout().ok_or("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let ready: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| format!("oidc-provider did not start ({e}): {line:?}"))?;
    Ok(Some(Server {
        _process: process,
        token_endpoint: ready["token_endpoint"]
            .as_str()
            .ok_or("token_endpoint")?
            .to_owned(),
        introspection_endpoint: ready["introspection_endpoint"]
            .as_str()
            .ok_or("introspection_endpoint")?
            .to_owned(),
    }))
}

/// What the server's introspection says of `token`.
async fn introspect(server: &Server, token: &str) -> Result<serde_json::Value, reqwest::Error> {
    http1()
        .post(&server.introspection_endpoint)
        .basic_auth("basic-client", Some(BASIC_SECRET))
        .form(&[("token", token)])
        .send()
        .await?
        .json()
        .await
}

#[tokio::test]
async fn a_real_authorization_server_accepts_our_assertions_and_secrets() -> TestResult {
    let dir = scratch_dir()?;
    let (rsa_crt, rsa_key) = make_pair(&dir, "oidc-rsa", "rsa")?;
    let (ec_crt, ec_key) = make_pair(&dir, "oidc-ec", "ec")?;
    let rsa_pem = std::fs::read_to_string(&rsa_crt)?;
    let ec_pem = std::fs::read_to_string(&ec_crt)?;
    let clients = serde_json::json!([
        { "client_id": "jwt-ps256", "certificate_pem": rsa_pem, "alg": "PS256" },
        { "client_id": "jwt-rs256", "certificate_pem": rsa_pem, "alg": "RS256" },
        { "client_id": "jwt-es256", "certificate_pem": ec_pem, "alg": "ES256" },
        { "client_id": "basic-client", "client_secret": BASIC_SECRET, "auth": "client_secret_basic" },
    ]);
    let Some(server) = start(&dir, clients)? else {
        return Ok(());
    };
    let (rsa_crt, rsa_key) = (rsa_crt.to_string_lossy(), rsa_key.to_string_lossy());
    let (ec_crt, ec_key) = (ec_crt.to_string_lossy(), ec_key.to_string_lossy());
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "jwt-ps256",
            vec![
                ("BEARER_PROXY_TOKEN_CERTIFICATE_FILE", &rsa_crt),
                ("BEARER_PROXY_TOKEN_PRIVATE_KEY_FILE", &rsa_key),
            ],
        ),
        (
            "jwt-rs256",
            vec![
                ("BEARER_PROXY_TOKEN_CERTIFICATE_FILE", &rsa_crt),
                ("BEARER_PROXY_TOKEN_PRIVATE_KEY_FILE", &rsa_key),
                ("BEARER_PROXY_TOKEN_ASSERTION_ALGORITHM", "RS256"),
            ],
        ),
        (
            "jwt-es256",
            vec![
                ("BEARER_PROXY_TOKEN_CERTIFICATE_FILE", &ec_crt),
                ("BEARER_PROXY_TOKEN_PRIVATE_KEY_FILE", &ec_key),
            ],
        ),
        (
            "basic-client",
            vec![
                ("API_CLIENT_SECRET", BASIC_SECRET),
                ("BEARER_PROXY_TOKEN_AUTH_METHOD", "client_secret_basic"),
            ],
        ),
    ];
    // The fake token endpoint is not used: every token comes from oidc-provider.
    let unused = FakeTokenEndpoint::start().await;
    for (client_id, settings) in cases {
        let upstream = FakeUpstream::start().await;
        let mut extra = vec![
            ("API_TOKEN_URL", server.token_endpoint.as_str()),
            ("API_CLIENT_ID", client_id),
            ("API_SCOPE", SCOPE),
            ("API_CLIENT_SECRET", ""),
        ];
        extra.extend(settings);
        let proxy = start_proxy(&unused, &upstream.url(), &extra).await;
        wait_ready(&proxy).await;
        let answer = http1().get(proxy.url("/data")).send().await?;
        assert_eq!(answer.status(), 200, "{client_id}");
        let token = upstream.last().bearer().to_owned();
        assert!(!token.is_empty(), "{client_id}");
        let said = introspect(&server, &token).await?;
        assert_eq!(said["active"], true, "{client_id}: {said}");
        assert_eq!(said["client_id"], client_id, "{said}");
        assert_eq!(said["scope"], SCOPE, "{said}");
        let status = proxy.status().await?;
        let kind = if client_id == "basic-client" {
            "client_secret"
        } else {
            "certificate"
        };
        assert_eq!(status["credential"]["kind"], kind, "{status}");
    }

    // A certificate the server does not know for the client: refused, and
    // the proxy says so in the provider's words.
    let (other_crt, other_key) = make_pair(&dir, "oidc-other", "rsa")?;
    let (other_crt, other_key) = (other_crt.to_string_lossy(), other_key.to_string_lossy());
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(
        &unused,
        &upstream.url(),
        &[
            ("API_TOKEN_URL", server.token_endpoint.as_str()),
            ("API_CLIENT_ID", "jwt-ps256"),
            ("API_SCOPE", SCOPE),
            ("API_CLIENT_SECRET", ""),
            ("BEARER_PROXY_TOKEN_CERTIFICATE_FILE", &other_crt),
            ("BEARER_PROXY_TOKEN_PRIVATE_KEY_FILE", &other_key),
        ],
    )
    .await;
    let mut last_error = serde_json::Value::Null;
    for _ in 0..200 {
        last_error = proxy.status().await?["token"]["last_error"].clone();
        if !last_error.is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(last_error["code"], "invalid_client", "{last_error}");
    let answer = http1().get(proxy.url("/data")).send().await?;
    assert_eq!(answer.status(), 503);
    assert_eq!(unused.count(), 0);
    Ok(())
}
