//! TLS client settings shared by the upstream and the token endpoint: one
//! rustls crypto provider (aws-lc-rs), the system roots plus `tls.ca_file`.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};

use crate::pki::{CertFiles, Reloading};

/// Installs aws-lc-rs as the process's rustls provider. rustls panics when it
/// must choose between two, so the choice is made once, explicitly, at start.
pub fn install_crypto_provider() {
    // An error only means that a provider is already installed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Reads a PEM bundle; an error says why in words.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate bundle: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Where trust comes from, for `check`: the system's roots and the bundle.
pub fn roots_description(ca_file: Option<&Path>) -> String {
    let system = rustls_native_certs::load_native_certs().certs.len();
    match ca_file {
        Some(path) => {
            let extra = read_ca_file(path).map(|c| c.len()).unwrap_or(0);
            format!(
                "{system} system certificates + {extra} from {} (tls.ca_file)",
                path.display()
            )
        }
        None => format!("{system} system certificates"),
    }
}

/// The client configuration: system roots plus the extra CA bundle, if any.
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipped a system root certificate source");
    }
    let (_, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::debug!(ignored, "skipped unparsable system root certificates");
    }
    if let Some(path) = ca_file {
        for cert in read_ca_file(path)? {
            roots.add(cert).map_err(|e| {
                format!(
                    "{}: a certificate cannot be used as a root: {e}",
                    path.display()
                )
            })?;
        }
    }
    if roots.is_empty() {
        tracing::warn!("no trusted root certificates: install ca-certificates or set tls.ca_file");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Reads and checks a client certificate and its key (`pki::load`), in the
/// form rustls presents.
pub fn load_client_cert(files: &CertFiles) -> Result<CertifiedKey, String> {
    Ok(crate::pki::load(files, SystemTime::now())?.certified_key())
}

/// Presents the client certificate, made again from the files when they
/// change on disk (`pki::Reloading`).
#[derive(Debug)]
struct ReloadingClientCert(Reloading<CertifiedKey>);

impl ResolvesClientCert for ReloadingClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The configuration for the upstream: `base`, with the client certificate
/// presented when one is configured.
pub fn upstream_config(
    base: &ClientConfig,
    client_cert: Option<&CertFiles>,
) -> Result<ClientConfig, String> {
    match client_cert {
        Some(files) => with_client_cert(base, files),
        None => Ok(base.clone()),
    }
}

/// `base` with the client certificate presented, reloaded on change.
pub fn with_client_cert(base: &ClientConfig, files: &CertFiles) -> Result<ClientConfig, String> {
    // A handshake looks at the files at most once a second.
    let key = Reloading::new(
        files.clone(),
        "client certificate",
        std::time::Duration::from_secs(1),
        load_client_cert,
    )?;
    let mut config = base.clone();
    // A resumed TLS session re-uses the identity it was made with: without
    // this, a rotated certificate would only be seen once tickets expired.
    config.resumption = rustls::client::Resumption::disabled();
    config.client_auth_cert_resolver = Arc::new(ReloadingClientCert(key));
    Ok(config)
}

/// A TLS failure somewhere in `error`'s causes, in words that name the
/// problem and what to do about it.
pub fn describe_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::CertificateError;
    let tls = crate::error_chain::find::<rustls::Error>(error)?;
    let words = match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => {
                "its certificate's issuer is not trusted (unknown issuer): add the issuing CA with tls.ca_file".to_owned()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "its certificate has expired".to_owned()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "its certificate is not valid yet (check this machine's clock)".to_owned()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "its certificate is not valid for this host name (wrong host name)".to_owned()
            }
            other => format!("its certificate was refused: {other:?}"),
        },
        other => other.to_string(),
    };
    Some(words)
}
