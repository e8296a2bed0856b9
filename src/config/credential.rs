//! The token request's side of the configuration: where tokens come from
//! (the endpoint's URL) and how the proxy proves who it is there
//! (`token.credential`), chosen by one setting or, when it is unset, by
//! what is given, as the Azure SDKs choose. The choice is kept with the
//! reason for it, which `check`, `/status` and the start-up log show.

use std::path::PathBuf;
use std::time::SystemTime;

use super::keys::{ENV_CLIENT_SECRET, ENV_IDENTITY_HEADER, IMDS_TOKEN_ENDPOINT};
use super::parse::{parse_key, parse_with, reject_credentials, trim_secret};
use super::sources::{Origin, RawConfig, RawValue, Source};
use super::types::{
    AssertionAlgorithm, AuthMethod, ConfigError, Credential, ManagedIdentityForm, SecretSource,
};
use crate::pki::{CertFiles, KeyKind};

/// The credential, why it was chosen, the client id and the URL tokens
/// are requested from.
pub(super) struct Chosen {
    pub(super) credential: Credential,
    pub(super) reason: String,
    pub(super) client_id: Option<String>,
    pub(super) url: reqwest::Url,
}

/// Chooses and checks the credential. `scope` is the validated
/// `token.scope` (a managed identity's resource comes from it).
pub(super) fn choose(raw: &RawConfig, scope: Option<&str>) -> Result<Chosen, ConfigError> {
    let (kind, reason) = kind(raw)?;
    let chosen = match kind {
        "certificate" => Chosen {
            credential: certificate(raw)?,
            client_id: Some(client_id(raw, false)?),
            url: token_url(raw, false)?,
            reason,
        },
        "workload_identity" => {
            let v = raw.get("token.federated_token_file").ok_or_else(|| {
                ConfigError::new(
                    "token.credential is workload_identity but no federated token file is set: expected \
                     AZURE_FEDERATED_TOKEN_FILE (the Azure workload identity webhook sets it) or \
                     token.federated_token_file",
                )
            })?;
            let token_file = PathBuf::from(&v.value);
            check_file(v, "token.federated_token_file", "the federated token")?;
            if tenant_origin(raw).is_none() {
                return Err(ConfigError::new(
                    "token.credential is workload_identity but no tenant is set: expected AZURE_TENANT_ID \
                     (the Azure workload identity webhook sets it), API_TENANT_ID or API_TOKEN_URL",
                ));
            }
            Chosen {
                credential: Credential::WorkloadIdentity { token_file },
                client_id: Some(client_id(raw, true)?),
                url: token_url(raw, true)?,
                reason,
            }
        }
        "managed_identity" => {
            let (form, url) = managed_identity(raw)?;
            let resource = scope
                .map(|s| s.strip_suffix("/.default").unwrap_or(s).to_owned())
                .ok_or_else(|| {
                    ConfigError::new(
                        "token.scope is none, but a managed identity asks for a token for a resource: \
                         expected a scope such as \"api://app-id/.default\" (its resource, \"api://app-id\", is sent)",
                    )
                })?;
            Chosen {
                credential: Credential::ManagedIdentity { form, resource },
                // A user-assigned identity's client id; none: the system-assigned one.
                client_id: optional_client_id(raw, true)?,
                url,
                reason,
            }
        }
        _ => Chosen {
            credential: Credential::Secret {
                source: secret_source(raw)?,
                method: parse_key(raw, "token.auth_method", |s| match s {
                    "client_secret_post" => Some(AuthMethod::ClientSecretPost),
                    "client_secret_basic" => Some(AuthMethod::ClientSecretBasic),
                    _ => None,
                })?,
            },
            client_id: Some(client_id(raw, false)?),
            url: token_url(raw, false)?,
            reason,
        },
    };
    Ok(chosen)
}

const KINDS: [&str; 4] = [
    "client_secret",
    "certificate",
    "workload_identity",
    "managed_identity",
];

/// The kind, from `token.credential` or from what is given, and why.
fn kind(raw: &RawConfig) -> Result<(&'static str, String), ConfigError> {
    let (kind, mut reason) = chosen_kind(raw)?;
    // What else was given, and is not used: a likely trap when moving from
    // one credential to another.
    let mut unused = Vec::new();
    if kind != "client_secret"
        && let Some(secret) = secret_origin(raw)
    {
        unused.push((secret, "client_secret"));
    }
    if kind != "certificate"
        && let Some(v) = raw.get("token.certificate_file")
    {
        unused.push((describe(v, "token.certificate_file"), "certificate"));
    }
    if kind != "workload_identity"
        && let Some(v) = raw.get("token.federated_token_file")
    {
        unused.push((
            describe(v, "token.federated_token_file"),
            "workload_identity",
        ));
    }
    for (origin, other) in unused {
        reason.push_str(&format!(
            "; {origin} is set too and not used (token.credential = \"{other}\" would use it)"
        ));
    }
    Ok((kind, reason))
}

fn chosen_kind(raw: &RawConfig) -> Result<(&'static str, String), ConfigError> {
    if let Some(v) = raw.get("token.credential") {
        let kind = parse_with(v, "token.credential", |s| {
            KINDS.iter().copied().find(|k| *k == s)
        })?;
        return Ok((
            kind,
            format!("{} = {kind}", describe(v, "token.credential")),
        ));
    }
    if let Some(secret) = secret_origin(raw) {
        return Ok((
            "client_secret",
            format!("a client secret is given ({secret})"),
        ));
    }
    if let Some(v) = raw.get("token.certificate_file") {
        return Ok((
            "certificate",
            format!("{} is set", describe(v, "token.certificate_file")),
        ));
    }
    if let Some(v) = raw.get("token.federated_token_file") {
        // As the Azure SDKs: the file, a client id and a tenant together.
        let client = match raw.get("token.client_id") {
            Some(id) => describe(id, "token.client_id"),
            None if raw.azure_client_id.is_some() => "AZURE_CLIENT_ID".to_owned(),
            None => {
                return Err(ConfigError::new(format!(
                    "{} is set but no client id is: expected AZURE_CLIENT_ID (the Azure workload identity \
                     webhook sets it) or API_CLIENT_ID",
                    describe(v, "token.federated_token_file")
                )));
            }
        };
        let tenant = tenant_origin(raw).ok_or_else(|| {
            ConfigError::new(format!(
                "{} is set but no tenant is: expected AZURE_TENANT_ID (the Azure workload identity \
                 webhook sets it), API_TENANT_ID or API_TOKEN_URL",
                describe(v, "token.federated_token_file")
            ))
        })?;
        return Ok((
            "workload_identity",
            format!(
                "{}, {client} and {tenant} are set and no client secret is: workload identity, as the Azure SDKs choose it",
                describe(v, "token.federated_token_file")
            ),
        ));
    }
    Ok(("client_secret", "the default".to_owned()))
}

/// Where workload identity's tenant comes from: `token.url`, a tenant that
/// is set, or `AZURE_TENANT_ID`; `None` leaves only the built-in default,
/// which is Kalibrate's, not the cluster's.
fn tenant_origin(raw: &RawConfig) -> Option<String> {
    if let Some(v) = raw.get("token.url") {
        return Some(describe(v, "token.url"));
    }
    match raw.get("token.tenant_id") {
        Some(v) if v.source != Source::Default => Some(describe(v, "token.tenant_id")),
        _ => raw
            .azure_tenant_id
            .as_ref()
            .map(|_| "AZURE_TENANT_ID".to_owned()),
    }
}

/// `AZURE_FEDERATED_TOKEN_FILE`, or `token.federated_token_file (in /path)`.
fn describe(v: &RawValue, key: &str) -> String {
    match &v.source {
        Source::Env(name) if !name.starts_with(super::keys::ENV_PREFIX) => name.clone(),
        source => Origin(key, source).to_string(),
    }
}

/// Where a client secret is given, if it is.
fn secret_origin(raw: &RawConfig) -> Option<String> {
    if raw.client_secret.is_some() {
        return Some(ENV_CLIENT_SECRET.to_owned());
    }
    raw.get("token.client_secret_file")
        .map(|v| describe(v, "token.client_secret_file"))
}

fn certificate(raw: &RawConfig) -> Result<Credential, ConfigError> {
    let (cert, key) = match (
        raw.get("token.certificate_file"),
        raw.get("token.private_key_file"),
    ) {
        (Some(cert), Some(key)) => (cert, key),
        (cert, _) => {
            let missing = if cert.is_some() {
                "token.private_key_file"
            } else {
                "token.certificate_file"
            };
            return Err(ConfigError::new(format!(
                "the certificate credential needs token.certificate_file and token.private_key_file; \
                 {missing} is not set: expected {}",
                super::parse::expected(missing)
            )));
        }
    };
    let files = CertFiles {
        cert: PathBuf::from(&cert.value),
        key: PathBuf::from(&key.value),
    };
    let both = || {
        format!(
            "{} and {}",
            Origin("token.certificate_file", &cert.source),
            Origin("token.private_key_file", &key.source)
        )
    };
    let identity = crate::pki::load(&files, SystemTime::now())
        .map_err(|e| ConfigError::new(format!("{}: {e}", both())))?;
    let Some(kind) = identity.key_kind() else {
        return Err(ConfigError::new(format!(
            "{}: the key in {} (Ed25519 or EC P-521) can serve TLS but cannot sign an assertion: \
             expected an RSA key, or EC on P-256 or P-384",
            both(),
            files.key.display()
        )));
    };
    let algorithm = match raw.get("token.assertion_algorithm") {
        None => None,
        Some(v) => Some(parse_with(v, "token.assertion_algorithm", |s| {
            match s.to_ascii_uppercase().as_str() {
                "PS256" => Some(AssertionAlgorithm::Ps256),
                "RS256" => Some(AssertionAlgorithm::Rs256),
                "ES256" => Some(AssertionAlgorithm::Es256),
                "ES384" => Some(AssertionAlgorithm::Es384),
                _ => None,
            }
        })?),
    };
    let algorithm = match (kind, algorithm) {
        (KeyKind::Rsa, None) => AssertionAlgorithm::Ps256,
        (KeyKind::EcP256, None) => AssertionAlgorithm::Es256,
        (KeyKind::EcP384, None) => AssertionAlgorithm::Es384,
        (KeyKind::Rsa, Some(a @ (AssertionAlgorithm::Ps256 | AssertionAlgorithm::Rs256)))
        | (KeyKind::EcP256, Some(a @ AssertionAlgorithm::Es256))
        | (KeyKind::EcP384, Some(a @ AssertionAlgorithm::Es384)) => a,
        (kind, Some(a)) => {
            let (v, key_words, fits) = match kind {
                KeyKind::Rsa => (
                    raw.get("token.assertion_algorithm"),
                    "an RSA key",
                    "PS256 or RS256",
                ),
                KeyKind::EcP256 => (
                    raw.get("token.assertion_algorithm"),
                    "an EC P-256 key",
                    "ES256",
                ),
                KeyKind::EcP384 => (
                    raw.get("token.assertion_algorithm"),
                    "an EC P-384 key",
                    "ES384",
                ),
            };
            let origin = v.map_or_else(
                || "token.assertion_algorithm".to_owned(),
                |v| Origin("token.assertion_algorithm", &v.source).to_string(),
            );
            return Err(ConfigError::new(format!(
                "{origin}: {} cannot be made with {key_words} (the one in {}): expected {fits}",
                a.name(),
                files.key.display()
            )));
        }
    };
    Ok(Credential::Certificate { files, algorithm })
}

/// A file that must be readable and not empty now (it is read again at
/// every token request).
fn check_file(v: &RawValue, key: &str, holding: &str) -> Result<(), ConfigError> {
    let path = PathBuf::from(&v.value);
    match std::fs::read_to_string(&path) {
        Ok(content) if !trim_secret(&content).trim().is_empty() => Ok(()),
        Ok(_) => Err(ConfigError::new(format!(
            "{}: the file {} is empty; expected {holding}",
            Origin(key, &v.source),
            path.display()
        ))),
        Err(e) => Err(ConfigError::new(format!(
            "{}: cannot read {}: {e}; expected a readable file holding {holding}",
            Origin(key, &v.source),
            path.display()
        ))),
    }
}

/// The managed identity's form and endpoint.
fn managed_identity(raw: &RawConfig) -> Result<(ManagedIdentityForm, reqwest::Url), ConfigError> {
    let endpoint = raw.get("token.managed_identity_endpoint");
    let url = match endpoint {
        Some(v) => {
            reject_credentials(v, "token.managed_identity_endpoint")?;
            parse_with(v, "token.managed_identity_endpoint", |s| {
                let url = reqwest::Url::parse(s).ok()?;
                (matches!(url.scheme(), "http" | "https")
                    && url.host().is_some()
                    && url.query().is_none())
                .then_some(url)
            })?
        }
        None => reqwest::Url::parse(IMDS_TOKEN_ENDPOINT)
            .map_err(|e| ConfigError::new(format!("the IMDS URL: {e}")))?,
    };
    let form = match (&raw.identity_header, endpoint) {
        (Some(header), Some(_)) => {
            let Ok(mut header) = http::HeaderValue::from_str(header.secret()) else {
                return Err(ConfigError::new(format!(
                    "{ENV_IDENTITY_HEADER}: expected printable ASCII that an HTTP header can carry \
                     (the value is not shown: it is a secret)"
                )));
            };
            header.set_sensitive(true);
            ManagedIdentityForm::AppService { header }
        }
        (Some(_), None) => {
            return Err(ConfigError::new(format!(
                "{ENV_IDENTITY_HEADER} is set but IDENTITY_ENDPOINT is not: expected both (App Service and \
                 Container Apps set them together), or neither for a VM's IMDS"
            )));
        }
        (None, Some(v)) if matches!(&v.source, Source::Env(name) if name == "IDENTITY_ENDPOINT") => {
            return Err(ConfigError::new(format!(
                "IDENTITY_ENDPOINT is set but {ENV_IDENTITY_HEADER} is not: expected both (App Service and \
                 Container Apps set them together)"
            )));
        }
        (None, _) => ManagedIdentityForm::Imds,
    };
    Ok((form, url))
}

/// The token endpoint: `token.url`, or Entra's v2.0 endpoint of the tenant
/// on `token.authority_host`. For workload identity, `AZURE_TENANT_ID`
/// stands in for a tenant that is not set.
fn token_url(raw: &RawConfig, azure_tenant: bool) -> Result<reqwest::Url, ConfigError> {
    if let Some(v) = raw.get("token.url") {
        reject_credentials(v, "token.url")?;
        return parse_with(v, "token.url", |s| {
            let url = reqwest::Url::parse(s).ok()?;
            (matches!(url.scheme(), "http" | "https")
                && url.host().is_some()
                && url.fragment().is_none())
            .then_some(url)
        });
    }
    let authority = parse_key(raw, "token.authority_host", |s| {
        let url = reqwest::Url::parse(s).ok()?;
        (matches!(url.scheme(), "http" | "https")
            && url.host().is_some()
            && url.query().is_none()
            && url.fragment().is_none())
        .then(|| s.trim_end_matches('/').to_owned())
    })?;
    let tenant = raw.require("token.tenant_id")?;
    let from_azure;
    let tenant = match &raw.azure_tenant_id {
        Some(id) if azure_tenant && tenant.source == Source::Default => {
            from_azure = RawValue {
                value: id.clone(),
                source: Source::Env("AZURE_TENANT_ID".to_owned()),
            };
            &from_azure
        }
        _ => tenant,
    };
    parse_with(tenant, "token.tenant_id", |s| {
        let valid = !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !valid {
            return None;
        }
        reqwest::Url::parse(&format!("{authority}/{s}/oauth2/v2.0/token")).ok()
    })
}

/// The client id; for workload identity, `AZURE_CLIENT_ID` stands in.
fn client_id(raw: &RawConfig, azure: bool) -> Result<String, ConfigError> {
    optional_client_id(raw, azure)?.ok_or_else(|| {
        ConfigError::new(if azure {
            "no client id: expected AZURE_CLIENT_ID (the Azure workload identity webhook sets it) or \
             API_CLIENT_ID (token.client_id in the config file)"
        } else {
            "API_CLIENT_ID is not set: expected the application (client) id that the provider issued \
             (token.client_id in the config file)"
        })
    })
}

fn optional_client_id(raw: &RawConfig, azure: bool) -> Result<Option<String>, ConfigError> {
    match raw.get("token.client_id") {
        Some(v) => parse_with(v, "token.client_id", |s| {
            (!s.is_empty()).then(|| s.to_owned())
        })
        .map(Some),
        None if azure => Ok(raw.azure_client_id.clone()),
        None => Ok(None),
    }
}

fn secret_source(raw: &RawConfig) -> Result<SecretSource, ConfigError> {
    let file = raw.get("token.client_secret_file");
    match (&raw.client_secret, file) {
        (Some(_), Some(file)) => Err(ConfigError::new(format!(
            "{ENV_CLIENT_SECRET} and {} are both set: expected only one source for the client secret",
            Origin("token.client_secret_file", &file.source)
        ))),
        (Some(secret), None) => Ok(SecretSource::Literal(secret.clone())),
        (None, Some(file)) => {
            check_file(
                file,
                "token.client_secret_file",
                "the client secret's value",
            )?;
            Ok(SecretSource::File(PathBuf::from(&file.value)))
        }
        (None, None) => Err(ConfigError::new(format!(
            "no client secret: set {ENV_CLIENT_SECRET} to the secret's value, or API_CLIENT_SECRET_FILE \
             (token.client_secret_file) to a file holding it; or choose another credential with \
             token.credential (certificate, workload_identity, managed_identity)"
        ))),
    }
}
