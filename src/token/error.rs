//! Why a token request failed, split as oauth2-rs does it: the provider said
//! no, the provider could not be reached, or its answer could not be read.

use std::time::Duration;

/// A provider's OAuth2 error answer (RFC 6749 §5.2 plus Entra's extra fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    /// HTTP status of the answer.
    pub status: u16,
    /// The `error` field: `invalid_client`, `invalid_scope`, ...
    pub error: String,
    /// Entra's `error_codes` (7000215, ...).
    pub codes: Vec<u64>,
    /// First line of `error_description` (without Entra's trace ids).
    pub description: Option<String>,
    /// `Retry-After`, when the answer carried one.
    pub retry_after: Option<Duration>,
}

/// A failed token request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// No connection to the token endpoint (DNS, refused, TLS).
    #[error("cannot reach the token endpoint: {0}")]
    Connect(String),
    /// No answer within `token.timeout`.
    #[error("the token endpoint did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The provider refused the request.
    #[error("the token endpoint refused the request: {}", describe(.0))]
    Rejected(ProviderError),
    /// An error status without an OAuth2 error body (a gateway's 502, say).
    #[error("the token endpoint answered HTTP {status} without an OAuth2 error body")]
    Status {
        /// HTTP status.
        status: u16,
        /// `Retry-After`, when the answer carried one.
        retry_after: Option<Duration>,
    },
    /// A success status whose body is not a usable token response.
    #[error("the token endpoint's answer is unusable: {0}")]
    InvalidResponse(String),
    /// The credential could not be used: its file is unreadable or empty,
    /// the certificate has expired, the assertion could not be signed.
    #[error("the credential cannot be used: {0}")]
    Credential(String),
}

impl TokenError {
    /// A short machine-readable code: the provider's `error` when it sent one.
    pub fn code(&self) -> &str {
        match self {
            TokenError::Connect(_) => "connect_failed",
            TokenError::Timeout(_) => "timeout",
            TokenError::Rejected(p) => &p.error,
            TokenError::Status { .. } => "http_error",
            TokenError::InvalidResponse(_) => "invalid_response",
            TokenError::Credential(_) => "credential_unusable",
        }
    }

    /// The outcome as the metrics count it: `rejected` (with the
    /// provider's code), `throttled` (429), `transport_error`,
    /// `http_error`, `invalid_response`, `credential_unusable`.
    pub fn outcome(&self) -> &'static str {
        match self {
            TokenError::Connect(_) | TokenError::Timeout(_) => "transport_error",
            TokenError::Rejected(p) if p.status == 429 => "throttled",
            TokenError::Rejected(_) => "rejected",
            TokenError::Status { status: 429, .. } => "throttled",
            TokenError::Status { .. } => "http_error",
            TokenError::InvalidResponse(_) => "invalid_response",
            TokenError::Credential(_) => "credential_unusable",
        }
    }

    /// The provider's own code, such as `AADSTS7000215`.
    pub fn provider_code(&self) -> Option<String> {
        match self {
            TokenError::Rejected(p) => p.codes.first().map(|c| format!("AADSTS{c}")),
            _ => None,
        }
    }

    /// The time the provider asked us to wait, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Rejected(p) => p.retry_after,
            TokenError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A rejection that repeating the same request will not cure: a wrong or
    /// expired secret, an unknown application, a bad scope.
    pub fn is_permanent(&self) -> bool {
        match self {
            TokenError::Rejected(p) => {
                matches!(
                    p.error.as_str(),
                    "invalid_client" | "unauthorized_client" | "invalid_scope"
                ) || p
                    .codes
                    .iter()
                    .any(|c| matches!(c, 7000215 | 7000222 | 700016 | 70011))
            }
            // Local files: reading them again costs the provider nothing,
            // and a file being replaced may be back at the next look.
            TokenError::Credential(_) => false,
            _ => false,
        }
    }

    /// A sentence a person can act on, where one is known.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            TokenError::Rejected(p) => hint(&p.error, &p.codes),
            TokenError::Connect(_) => Some(
                "check the token endpoint URL (token.url or token.tenant_id), DNS and any firewall or proxy",
            ),
            TokenError::Timeout(_) => {
                Some("the token endpoint is slow or unreachable; check the network path to it")
            }
            TokenError::Credential(_) => Some(
                "check the credential's file named above (token.client_secret_file, token.certificate_file, \
                 token.private_key_file or token.federated_token_file)",
            ),
            TokenError::Status { .. } | TokenError::InvalidResponse(_) => None,
        }
    }
}

fn describe(p: &ProviderError) -> String {
    let mut text = format!("HTTP {} {}", p.status, p.error);
    if let Some(code) = p.codes.first() {
        text.push_str(&format!(" (AADSTS{code})"));
    }
    if let Some(hint) = hint(&p.error, &p.codes) {
        text.push_str(": ");
        text.push_str(hint);
    } else if let Some(description) = &p.description {
        text.push_str(": ");
        text.push_str(description);
    }
    text
}

/// What a provider error means, in a sentence a person can act on. Branches
/// on the `error_codes` and `error` fields, never on the description's text.
pub fn hint(error: &str, codes: &[u64]) -> Option<&'static str> {
    for code in codes {
        let hint = match code {
            7000215 => "the client secret is wrong: copy the secret's value, not its id",
            7000222 => {
                "the client secret has expired: create a new one in the app registration and update API_CLIENT_SECRET"
            }
            700016 => {
                "the application was not found in this tenant: check API_CLIENT_ID and the tenant id"
            }
            700027 => {
                "the client assertion's signature is invalid: check the certificate registered for the application"
            }
            700021 => "the client assertion's issuer is wrong: it must be the client id",
            700024 => {
                "the client assertion is not within its valid time: check this machine's clock, or the federated token file's rotation"
            }
            70021 | 700211 | 700213 => {
                "no federated credential of the application matches the presented token's issuer and subject: check the app's federated credentials (issuer, subject system:serviceaccount:<namespace>:<name>)"
            }
            700023 => "the client assertion's audience is wrong: it must be the token endpoint URL",
            70011 => {
                "the scope is invalid: it must name one resource followed by /.default, such as api://<app-id>/.default"
            }
            50196 => "the provider is throttling this client for requesting tokens too often",
            90002 | 900023 => {
                "the tenant was not found: check the tenant id (token.tenant_id) or token.url"
            }
            _ => continue,
        };
        return Some(hint);
    }
    match error {
        "invalid_client" => Some(
            "the client id or its credential was rejected: check API_CLIENT_ID and the secret, certificate or federated token",
        ),
        "unauthorized_client" => {
            Some("the application is not allowed to use the client-credentials grant")
        }
        "invalid_scope" => Some("the scope is invalid: check API_SCOPE"),
        "invalid_request" => {
            Some("the provider rejected the request's form: check token.url and the tenant id")
        }
        "temporarily_unavailable" => {
            Some("the provider is temporarily unavailable; it will be retried")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(error: &str, codes: &[u64]) -> TokenError {
        TokenError::Rejected(ProviderError {
            status: 401,
            error: error.to_owned(),
            codes: codes.to_vec(),
            description: None,
            retry_after: None,
        })
    }

    #[test]
    fn each_entra_code_has_its_sentence() {
        let cases: &[(u64, &str)] = &[
            (7000215, "value, not its id"),
            (7000222, "expired"),
            (700016, "API_CLIENT_ID"),
            (700027, "signature"),
            (700021, "issuer"),
            (700023, "audience"),
            (70011, "scope"),
            (50196, "throttling"),
            (90002, "tenant"),
        ];
        for (code, words) in cases {
            let h = hint("invalid_client", &[*code]).unwrap_or_default();
            assert!(h.contains(words), "{code}: {h}");
        }
    }

    #[test]
    fn error_field_is_the_fallback() {
        assert!(
            hint("invalid_scope", &[])
                .unwrap_or_default()
                .contains("API_SCOPE")
        );
        assert!(
            hint("invalid_client", &[])
                .unwrap_or_default()
                .contains("secret")
        );
        assert_eq!(hint("something_new", &[]), None);
    }

    #[test]
    fn permanence_and_codes() {
        let e = rejected("invalid_client", &[7000215]);
        assert!(e.is_permanent());
        assert_eq!(e.provider_code().as_deref(), Some("AADSTS7000215"));
        assert_eq!(e.code(), "invalid_client");
        assert!(e.to_string().contains("AADSTS7000215"), "{e}");
        assert!(!rejected("temporarily_unavailable", &[]).is_permanent());
        assert!(!TokenError::Timeout(Duration::from_secs(1)).is_permanent());
    }
}
