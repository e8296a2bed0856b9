//! Client assertions (RFC 7523 §2.2, RFC 7521): the certificate
//! credential's signed JWT, made afresh for every token request, and the
//! federated token that workload identity reads from its file. An
//! assertion is a credential: it is never logged or shown.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::TokenError;
use crate::config::{AssertionAlgorithm, trim_secret};
use crate::pki::{CertFiles, Identity, Reloading, Scheme};
use crate::secret::Assertion;

/// `client_assertion_type` of a JWT assertion.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion is valid: MSAL's ten minutes.
const LIFETIME: Duration = Duration::from_secs(600);

/// Signs assertions with a certificate's key; the files are read again
/// when they change, so a rotated certificate needs no restart.
#[derive(Debug)]
pub struct CertificateAssertion {
    identity: Reloading<Identity>,
    algorithm: AssertionAlgorithm,
}

impl CertificateAssertion {
    /// Loads and checks the files (`pki::load`).
    pub fn new(files: &CertFiles, algorithm: AssertionAlgorithm) -> Result<Self, String> {
        Ok(Self {
            // Token requests are minutes apart: the files are looked at
            // before each one.
            identity: Reloading::new(
                files.clone(),
                "certificate credential",
                Duration::ZERO,
                |files| crate::pki::load(files, SystemTime::now()),
            )?,
            algorithm,
        })
    }

    /// The certificate in use, for `check` and `/status`: its thumbprint
    /// as the Entra portal shows it, and when it expires.
    pub fn describe(&self) -> String {
        let identity = self.identity.peek();
        // SHA-1, upper case: what the Entra portal lists for the certificate.
        let thumbprint = hex(&identity.sha1).to_ascii_uppercase();
        format!(
            "{} (thumbprint {thumbprint}, expires {}), signed {}",
            self.identity.files().cert.display(),
            identity.expires(),
            self.algorithm.name()
        )
    }

    /// When the certificate in use expires, in Unix seconds.
    pub fn expires(&self) -> i64 {
        self.identity.peek().not_after
    }

    /// A signed assertion for `client_id` at `audience` (the token URL):
    /// `iss` = `sub` = the client id, a new `jti`, valid from `now` for ten
    /// minutes; the header names the certificate by `x5t#S256` (`x5t`, the
    /// SHA-1 thumbprint, for RS256).
    pub fn sign(
        &self,
        client_id: &str,
        audience: &str,
        now: SystemTime,
    ) -> Result<Assertion, TokenError> {
        let identity = self.identity.current();
        let at = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let files = self.identity.files();
        if at > identity.not_after {
            return Err(TokenError::Credential(format!(
                "the certificate in {} expired on {}: renew it (the proxy reads the new one without a restart)",
                files.cert.display(),
                identity.expires()
            )));
        }
        let (alg, scheme) = match self.algorithm {
            AssertionAlgorithm::Ps256 => ("PS256", Scheme::RsaPssSha256),
            AssertionAlgorithm::Rs256 => ("RS256", Scheme::RsaPkcs1Sha256),
            AssertionAlgorithm::Es256 => ("ES256", Scheme::Ecdsa),
            AssertionAlgorithm::Es384 => ("ES384", Scheme::Ecdsa),
        };
        let header = if self.algorithm == AssertionAlgorithm::Rs256 {
            serde_json::json!({ "alg": alg, "typ": "JWT", "x5t": URL_SAFE_NO_PAD.encode(&identity.sha1) })
        } else {
            serde_json::json!({ "alg": alg, "typ": "JWT", "x5t#S256": URL_SAFE_NO_PAD.encode(&identity.sha256) })
        };
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": uuid_v4()?,
            "nbf": at,
            "iat": at,
            "exp": at.saturating_add(LIFETIME.as_secs() as i64),
        });
        let mut jwt = URL_SAFE_NO_PAD.encode(header.to_string());
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = identity
            .sign(scheme, jwt.as_bytes())
            .map_err(|e| TokenError::Credential(format!("{} ({})", e, files.key.display())))?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(Assertion::new(jwt))
    }

    /// The identity in use (tests read its thumbprints).
    pub fn identity(&self) -> Arc<Identity> {
        self.identity.current()
    }
}

/// Reads a federated token (workload identity) afresh: Kubernetes rotates
/// the file. Its content, trimmed, is the assertion.
pub async fn read_federated_token(path: &Path) -> Result<Assertion, TokenError> {
    read_credential_file(path, "federated token file", |content| {
        trim_secret(content).trim()
    })
    .await
    .map(Assertion::new)
}

/// A credential's file, read afresh at every token request (a rotated
/// one needs no restart) and trimmed by `trim`; unreadable or empty, an
/// error that names `what` and the file.
pub async fn read_credential_file(
    path: &Path,
    what: &str,
    trim: fn(&str) -> &str,
) -> Result<String, TokenError> {
    let content = tokio::fs::read_to_string(path).await.map_err(|e| {
        TokenError::Credential(format!("cannot read the {what} {}: {e}", path.display()))
    })?;
    let value = trim(&content);
    if value.is_empty() {
        return Err(TokenError::Credential(format!(
            "the {what} {} is empty",
            path.display()
        )));
    }
    Ok(value.to_owned())
}

/// A random (version 4) UUID, as Entra's `jti` examples have it.
fn uuid_v4() -> Result<String, TokenError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| TokenError::Credential("no random bytes for the assertion's id".into()))?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h = hex(&bytes);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
