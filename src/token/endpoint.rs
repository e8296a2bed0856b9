//! The token endpoint client: one client-credentials form POST (with a
//! client secret, a signed assertion or a federated token), or a managed
//! identity's GET; the answer parsed into a token or a [`TokenError`].
//! Neither the form nor the query is ever logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::RETRY_AFTER;
use serde::Deserialize;

use super::assertion::{
    CertificateAssertion, JWT_BEARER, read_credential_file, read_federated_token,
};
use super::{Fetched, TokenError, TokenSource};
use crate::config::{
    AuthMethod, Credential, ManagedIdentityForm, SecretSource, TokenConfig, trim_secret,
};
use crate::error_chain::chain;
use crate::secret::{AccessToken, Assertion, ClientSecret};
use crate::token::error::ProviderError;

/// Largest token endpoint answer read; a real one is a few KiB.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Talks to an OAuth2 token endpoint with the client-credentials grant,
/// or to a managed identity's endpoint.
#[derive(Debug, Clone)]
pub struct TokenEndpoint {
    http: reqwest::Client,
    config: TokenConfig,
    proof: Proof,
}

/// How each request proves the client, made from the configuration once.
#[derive(Debug, Clone)]
enum Proof {
    Secret(SecretSource, AuthMethod),
    Certificate(Arc<CertificateAssertion>),
    Federated(PathBuf),
    ManagedIdentity(ManagedIdentityForm, String),
}

impl TokenEndpoint {
    /// A client for `config`, with the shared TLS settings, no redirects.
    pub fn new(
        config: TokenConfig,
        tls: rustls::ClientConfig,
        user_agent: &http::HeaderValue,
        proxies: &crate::egress::Proxies,
    ) -> Result<Self, TokenError> {
        let proof = match &config.credential {
            Credential::Secret { source, method } => Proof::Secret(source.clone(), *method),
            Credential::Certificate { files, algorithm } => Proof::Certificate(Arc::new(
                CertificateAssertion::new(files, *algorithm).map_err(TokenError::Credential)?,
            )),
            Credential::WorkloadIdentity { token_file } => Proof::Federated(token_file.clone()),
            Credential::ManagedIdentity { form, resource } => {
                Proof::ManagedIdentity(form.clone(), resource.clone())
            }
        };
        // The proxies come from the configuration (read through the same
        // environment trait as everything else), never straight from reqwest.
        let mut builder = reqwest::Client::builder().no_proxy();
        if proxies.any() && config.credential.uses_proxies() {
            let proxies = proxies.clone();
            builder = builder.proxy(reqwest::Proxy::custom(move |url| {
                proxies
                    .for_url(url.as_str())
                    .map(|proxy| proxy.secret().to_owned())
            }));
        }
        let http = builder
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(user_agent.clone())
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .build()
            .map_err(|e| {
                TokenError::Connect(format!("cannot build the HTTP client: {}", chain(&e)))
            })?;
        Ok(Self {
            http,
            config,
            proof,
        })
    }

    /// The endpoint's URL.
    pub fn url(&self) -> &reqwest::Url {
        &self.config.url
    }

    /// The credential as `check` and `/status` show it: its kind, why it
    /// was chosen, and for a certificate, which one. Never the material.
    pub fn credential(&self) -> CredentialInfo {
        let config = &self.config;
        let detail = match &self.proof {
            Proof::Secret(SecretSource::Literal(_), method) => {
                format!("API_CLIENT_SECRET, sent by {}", method_name(*method))
            }
            Proof::Secret(SecretSource::File(path), method) => {
                format!("{}, sent by {}", path.display(), method_name(*method))
            }
            Proof::Certificate(assertion) => assertion.describe(),
            Proof::Federated(path) => format!("federated token from {}", path.display()),
            Proof::ManagedIdentity(form, resource) => {
                let form = match form {
                    ManagedIdentityForm::Imds => "the VM's IMDS",
                    ManagedIdentityForm::AppService { .. } => "App Service's identity endpoint",
                };
                let identity = match &config.client_id {
                    Some(id) => format!("user-assigned identity {id}"),
                    None => "system-assigned identity".to_owned(),
                };
                format!("{identity} from {form}, for resource {resource}")
            }
        };
        CredentialInfo {
            kind: config.credential.kind(),
            reason: config.credential_reason.clone(),
            detail,
            certificate_expires: match &self.proof {
                Proof::Certificate(assertion) => Some(assertion.expires()),
                _ => None,
            },
        }
    }

    /// The certificate credential's signer (tests check its assertions).
    pub fn certificate(&self) -> Option<&CertificateAssertion> {
        match &self.proof {
            Proof::Certificate(assertion) => Some(assertion),
            _ => None,
        }
    }

    async fn fetch_from_managed_identity(
        &self,
        form: &ManagedIdentityForm,
        resource: &str,
    ) -> Result<Fetched, TokenError> {
        let config = &self.config;
        let mut url = config.url.clone();
        {
            let mut query = url.query_pairs_mut();
            query.append_pair(
                "api-version",
                match form {
                    ManagedIdentityForm::Imds => "2018-02-01",
                    ManagedIdentityForm::AppService { .. } => "2019-08-01",
                },
            );
            query.append_pair("resource", resource);
            if let Some(id) = &config.client_id {
                query.append_pair("client_id", id);
            }
            for (name, value) in &config.extra_params {
                query.append_pair(name, value);
            }
        }
        let request = match form {
            ManagedIdentityForm::Imds => self.http.get(url).header("Metadata", "true"),
            ManagedIdentityForm::AppService { header } => self
                .http
                .get(url)
                .header("X-IDENTITY-HEADER", header.clone()),
        };
        self.send(request).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Fetched, TokenError> {
        let timeout = self.config.timeout;
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(&e, timeout))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| parse_retry_after(v.to_str().ok()?, SystemTime::now()));
        let body = read_limited(response, timeout).await?;
        if status.is_success() {
            parse_success(&body, SystemTime::now())
        } else {
            Err(parse_error(status.as_u16(), &body, retry_after))
        }
    }
}

/// What proves the client in one token request.
enum Sent {
    Secret(ClientSecret, AuthMethod),
    Assertion(Assertion),
}

/// The credential in use, in words (`check`, `/status`).
#[derive(Debug, Clone)]
pub struct CredentialInfo {
    /// `client_secret`, `certificate`, `workload_identity`, `managed_identity`.
    pub kind: &'static str,
    /// Which setting or variables chose it.
    pub reason: String,
    /// Where it comes from: a file, a certificate's thumbprint, an endpoint.
    pub detail: String,
    /// A certificate's expiry, in Unix seconds.
    pub certificate_expires: Option<i64>,
}

fn method_name(method: AuthMethod) -> &'static str {
    match method {
        AuthMethod::ClientSecretPost => "client_secret_post",
        AuthMethod::ClientSecretBasic => "client_secret_basic",
    }
}

impl TokenSource for TokenEndpoint {
    async fn fetch(&self) -> Result<Fetched, TokenError> {
        let config = &self.config;
        let client_id = config.client_id.as_deref().unwrap_or_default();
        // The proof is read or made first, so that it outlives the form.
        let proof = match &self.proof {
            Proof::ManagedIdentity(form, resource) => {
                return self.fetch_from_managed_identity(form, resource).await;
            }
            Proof::Secret(source, method) => Sent::Secret(load_secret(source).await?, *method),
            Proof::Certificate(signer) => {
                Sent::Assertion(signer.sign(client_id, config.url.as_str(), SystemTime::now())?)
            }
            Proof::Federated(path) => Sent::Assertion(read_federated_token(path).await?),
        };
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        if let Some(scope) = &config.scope {
            form.push(("scope", scope.as_str()));
        }
        form.extend(
            config
                .extra_params
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str())),
        );
        let mut request = self.http.post(config.url.clone());
        match &proof {
            Sent::Secret(secret, AuthMethod::ClientSecretBasic) => {
                // RFC 6749 §2.3.1: both parts are form-encoded before Base64.
                let id: String = form_urlencoded::byte_serialize(client_id.as_bytes()).collect();
                let secret: String =
                    form_urlencoded::byte_serialize(secret.secret().as_bytes()).collect();
                request = request.basic_auth(id, Some(secret));
            }
            Sent::Secret(secret, AuthMethod::ClientSecretPost) => {
                form.push(("client_id", client_id));
                form.push(("client_secret", secret.secret()));
            }
            Sent::Assertion(assertion) => {
                form.push(("client_id", client_id));
                form.push(("client_assertion_type", JWT_BEARER));
                form.push(("client_assertion", assertion.secret()));
            }
        }
        self.send(request.form(&form)).await
    }
}

async fn load_secret(source: &SecretSource) -> Result<ClientSecret, TokenError> {
    match source {
        SecretSource::Literal(secret) => Ok(secret.clone()),
        SecretSource::File(path) => read_credential_file(path, "client secret file", trim_secret)
            .await
            .map(ClientSecret::new),
    }
}

async fn read_limited(
    mut response: reqwest::Response,
    timeout: Duration,
) -> Result<Vec<u8>, TokenError> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(TokenError::InvalidResponse(format!(
                        "the answer is larger than {} KiB",
                        MAX_RESPONSE_BYTES / 1024
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(transport_error(&e, timeout)),
        }
    }
}

fn transport_error(e: &reqwest::Error, timeout: Duration) -> TokenError {
    if e.is_timeout() {
        TokenError::Timeout(timeout)
    } else if let Some(tls) = crate::tls::describe_failure(e) {
        TokenError::Connect(format!("TLS with the token endpoint failed: {tls}"))
    } else {
        TokenError::Connect(chain(e))
    }
}

/// `expires_in` and `refresh_in` arrive as numbers or, from some providers, strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Seconds {
    Number(serde_json::Number),
    Text(String),
}

impl Seconds {
    fn value(&self) -> Option<f64> {
        match self {
            Seconds::Number(n) => n.as_f64(),
            Seconds::Text(s) => s.trim().parse::<f64>().ok(),
        }
    }

    /// A lifetime: at least a second, less than 1e9.
    fn duration(&self) -> Option<Duration> {
        lifetime(self.value()?)
    }

    /// A moment (`expires_on`, Unix seconds) as the lifetime left at `now`.
    fn until(&self, now: SystemTime) -> Option<Duration> {
        lifetime(self.value()? - now.duration_since(UNIX_EPOCH).ok()?.as_secs_f64())
    }
}

/// Seconds as a token's lifetime: at least one, less than 1e9.
fn lifetime(secs: f64) -> Option<Duration> {
    (1.0..1e9)
        .contains(&secs)
        .then(|| Duration::from_secs(secs as u64))
}

#[derive(Debug, Deserialize)]
struct SuccessBody {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<Seconds>,
    /// Managed identity's answers carry it, App Service's without `expires_in`.
    expires_on: Option<Seconds>,
    refresh_in: Option<Seconds>,
}

fn parse_success(body: &[u8], now: SystemTime) -> Result<Fetched, TokenError> {
    let parsed: SuccessBody = serde_json::from_slice(body)
        .map_err(|e| TokenError::InvalidResponse(format!("not a JSON token response ({e})")))?;
    let token = parsed
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| TokenError::InvalidResponse("no access_token".into()))?;
    if let Some(kind) = &parsed.token_type
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(TokenError::InvalidResponse(format!(
            "token_type is {kind:?}, not Bearer"
        )));
    }
    if http::HeaderValue::from_str(&token).is_err() {
        return Err(TokenError::InvalidResponse(
            "access_token is not valid in an HTTP header".into(),
        ));
    }
    // Both, from a managed identity: the earlier end wins (IMDS may hand
    // out a cached token whose expires_in counts from its issue).
    let expires_in = match (
        parsed.expires_in.as_ref().and_then(Seconds::duration),
        parsed.expires_on.as_ref().and_then(|at| at.until(now)),
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
    .ok_or_else(|| {
        TokenError::InvalidResponse(
            "no usable expires_in (seconds, at least 1) or expires_on (Unix time, in the future)"
                .into(),
        )
    })?;
    let refresh_in = parsed
        .refresh_in
        .as_ref()
        .and_then(Seconds::duration)
        .filter(|r| *r < expires_in);
    Ok(Fetched {
        token: AccessToken::new(token),
        expires_in,
        refresh_in,
    })
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: Option<String>,
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Vec<u64>,
}

fn parse_error(status: u16, body: &[u8], retry_after: Option<Duration>) -> TokenError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody {
            error: Some(error),
            error_description,
            error_codes,
        }) => TokenError::Rejected(ProviderError {
            status,
            error,
            codes: error_codes,
            description: error_description
                .and_then(|d| d.lines().next().map(|line| line.trim().to_owned())),
            retry_after,
        }),
        _ => TokenError::Status {
            status,
            retry_after,
        },
    }
}

/// `Retry-After` as seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_success_now(body: &[u8]) -> Result<Fetched, TokenError> {
        parse_success(body, SystemTime::now())
    }

    #[test]
    fn managed_identity_answers_with_strings_and_expires_on() -> Result<(), TokenError> {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // IMDS: both, as strings; the earlier end wins.
        let f = parse_success(
            br#"{"access_token":"a","client_id":"c","expires_in":"86399","expires_on":"1700086399","ext_expires_in":"86399","not_before":"1699999700","resource":"api://x","token_type":"Bearer"}"#,
            now,
        )?;
        assert_eq!(f.expires_in, Duration::from_secs(86_399));
        let f = parse_success(
            br#"{"access_token":"a","expires_in":"86399","expires_on":"1700080000","token_type":"Bearer"}"#,
            now,
        )?;
        assert_eq!(f.expires_in, Duration::from_secs(80_000), "a cached token");
        // App Service 2019-08-01: expires_on only.
        let f = parse_success(
            br#"{"access_token":"a","expires_on":"1700003600","resource":"api://x","token_type":"Bearer","client_id":"c"}"#,
            now,
        )?;
        assert_eq!(f.expires_in, Duration::from_secs(3600));
        // Already past: unusable.
        assert!(
            parse_success(
                br#"{"access_token":"a","expires_on":"1699999999","token_type":"Bearer"}"#,
                now
            )
            .is_err()
        );
        Ok(())
    }

    #[test]
    fn success_with_number_or_string_lifetime() -> Result<(), TokenError> {
        let f = parse_success_now(br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"abc"}"#)?;
        assert_eq!(f.expires_in, Duration::from_secs(3599));
        assert_eq!(f.token.secret(), "abc");
        let f = parse_success_now(
            br#"{"token_type":"bearer","expires_in":"600","refresh_in":"300","access_token":"x"}"#,
        )?;
        assert_eq!(f.expires_in, Duration::from_secs(600));
        assert_eq!(f.refresh_in, Some(Duration::from_secs(300)));
        Ok(())
    }

    #[test]
    fn unusable_success_bodies_are_errors() {
        for body in [
            &br#"{"token_type":"Bearer","access_token":"abc"}"#[..],
            br#"{"token_type":"Bearer","expires_in":"soon","access_token":"abc"}"#,
            br#"{"token_type":"Bearer","expires_in":0,"access_token":"abc"}"#,
            br#"{"token_type":"Bearer","expires_in":3599}"#,
            br#"{"token_type":"pop","expires_in":3599,"access_token":"abc"}"#,
            br#"{"token_type":"Bearer","expires_in":3599,"access_token":"a\nb"}"#,
            b"<html>",
        ] {
            assert!(matches!(
                parse_success_now(body),
                Err(TokenError::InvalidResponse(_))
            ));
        }
    }

    #[test]
    fn entra_error_body_is_parsed() {
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 1\r\nCorrelation ID: 2","error_codes":[7000215],"timestamp":"2026-01-01 00:00:00Z","trace_id":"1","correlation_id":"2","error_uri":"https://login.microsoftonline.com/error?code=7000215"}"#;
        let e = parse_error(401, body, None);
        let TokenError::Rejected(p) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(p.error, "invalid_client");
        assert_eq!(p.codes, vec![7000215]);
        assert_eq!(
            p.description.as_deref(),
            Some("AADSTS7000215: Invalid client secret provided.")
        );
        assert!(matches!(
            parse_error(502, b"<html>bad gateway</html>", None),
            TokenError::Status { status: 502, .. }
        ));
    }

    #[test]
    fn retry_after_seconds_and_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
