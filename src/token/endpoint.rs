//! The token endpoint client: one client-credentials form POST, its answer
//! parsed into a token or a [`TokenError`]. The form is never logged.

use std::time::{Duration, SystemTime};

use http::header::RETRY_AFTER;
use serde::Deserialize;

use super::{Fetched, TokenError, TokenSource};
use crate::config::{AuthMethod, SecretSource, TokenConfig, trim_secret};
use crate::error_chain::chain;
use crate::secret::{AccessToken, ClientSecret};
use crate::token::error::ProviderError;

/// Largest token endpoint answer read; a real one is a few KiB.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Talks to an OAuth2 token endpoint with the client-credentials grant.
#[derive(Debug, Clone)]
pub struct TokenEndpoint {
    http: reqwest::Client,
    config: TokenConfig,
}

impl TokenEndpoint {
    /// A client for `config`, with the shared TLS settings, no redirects.
    pub fn new(
        config: TokenConfig,
        tls: rustls::ClientConfig,
        user_agent: &http::HeaderValue,
        proxies: &crate::egress::Proxies,
    ) -> Result<Self, TokenError> {
        // The proxies come from the configuration (read through the same
        // environment trait as everything else), never straight from reqwest.
        let mut builder = reqwest::Client::builder().no_proxy();
        if proxies.any() {
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
        Ok(Self { http, config })
    }

    /// The endpoint's URL.
    pub fn url(&self) -> &reqwest::Url {
        &self.config.url
    }
}

impl TokenSource for TokenEndpoint {
    async fn fetch(&self) -> Result<Fetched, TokenError> {
        let secret = load_secret(&self.config.secret).await?;
        let config = &self.config;
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
        match config.auth_method {
            AuthMethod::ClientSecretPost => {
                form.push(("client_id", config.client_id.as_str()));
                form.push(("client_secret", secret.secret()));
            }
            AuthMethod::ClientSecretBasic => {
                // RFC 6749 §2.3.1: both parts are form-encoded before Base64.
                let id: String =
                    form_urlencoded::byte_serialize(config.client_id.as_bytes()).collect();
                let secret: String =
                    form_urlencoded::byte_serialize(secret.secret().as_bytes()).collect();
                request = request.basic_auth(id, Some(secret));
            }
        }
        let response = request
            .form(&form)
            .send()
            .await
            .map_err(|e| transport_error(&e, config.timeout))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| parse_retry_after(v.to_str().ok()?, SystemTime::now()));
        let body = read_limited(response, config.timeout).await?;
        if status.is_success() {
            parse_success(&body)
        } else {
            Err(parse_error(status.as_u16(), &body, retry_after))
        }
    }
}

async fn load_secret(source: &SecretSource) -> Result<ClientSecret, TokenError> {
    match source {
        SecretSource::Literal(secret) => Ok(secret.clone()),
        SecretSource::File(path) => {
            let content = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| TokenError::Secret(format!("{}: {e}", path.display())))?;
            let secret = trim_secret(&content);
            if secret.is_empty() {
                return Err(TokenError::Secret(format!("{} is empty", path.display())));
            }
            Ok(ClientSecret::new(secret))
        }
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
    fn duration(&self) -> Option<Duration> {
        let secs = match self {
            Seconds::Number(n) => n.as_f64()?,
            Seconds::Text(s) => s.trim().parse::<f64>().ok()?,
        };
        (1.0..1e9)
            .contains(&secs)
            .then(|| Duration::from_secs(secs as u64))
    }
}

#[derive(Debug, Deserialize)]
struct SuccessBody {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<Seconds>,
    refresh_in: Option<Seconds>,
}

fn parse_success(body: &[u8]) -> Result<Fetched, TokenError> {
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
    let expires_in = parsed
        .expires_in
        .as_ref()
        .and_then(Seconds::duration)
        .ok_or_else(|| {
            TokenError::InvalidResponse("no usable expires_in (seconds, at least 1)".into())
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

    #[test]
    fn success_with_number_or_string_lifetime() -> Result<(), TokenError> {
        let f = parse_success(br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"abc"}"#)?;
        assert_eq!(f.expires_in, Duration::from_secs(3599));
        assert_eq!(f.token.secret(), "abc");
        let f = parse_success(
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
                parse_success(body),
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
