//! TLS client settings shared by the upstream and the token endpoint: one
//! rustls crypto provider (aws-lc-rs), the system roots plus `tls.ca_file`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};

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

/// The upstream's client certificate and key files (mTLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
}

/// Reads and checks a certificate and its key: both parse, and the key is
/// the certificate's.
pub fn load_client_cert(files: &ClientCertFiles) -> Result<CertifiedKey, String> {
    let cert_bytes = std::fs::read(&files.cert)
        .map_err(|e| format!("cannot read {}: {e}", files.cert.display()))?;
    let certs = CertificateDer::pem_slice_iter(&cert_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{} is not a PEM certificate chain: {e}",
                files.cert.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", files.cert.display()));
    }
    let key_bytes = std::fs::read(&files.key)
        .map_err(|e| format!("cannot read {}: {e}", files.key.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        format!(
            "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
            files.key.display()
        )
    })?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(|e| {
        format!(
            "the key in {} does not belong to the certificate in {}: {e}",
            files.key.display(),
            files.cert.display()
        )
    })
}

/// Presents the client certificate, re-reading the files when they change
/// on disk, so a rotated certificate needs no restart. The files are looked
/// at no more than once a second; a pair that fails to load (half-written,
/// mismatched, unreadable) leaves the previous one in use and is tried again
/// at the next look.
#[derive(Debug)]
struct ReloadingClientCert {
    files: ClientCertFiles,
    state: Mutex<ReloadState>,
}

#[derive(Debug)]
struct ReloadState {
    key: Arc<CertifiedKey>,
    /// The files as they were when `key` was loaded.
    loaded: Option<FileStamp>,
    /// The files as they were at the last failed load (warned about once).
    failed: Option<FileStamp>,
    checked: std::time::Instant,
}

/// How often the files are looked at, at most.
const RELOAD_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// What identifies a version of the two files: modification and change
/// times (a chmod changes only the latter), length, inode.
type FileStamp = [(SystemTime, i64, u64, u64); 2];

fn stamp(files: &ClientCertFiles) -> Option<FileStamp> {
    let one = |path: &Path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((
            meta.modified().ok()?,
            meta.ctime_nsec() + meta.ctime() * 1_000_000_000,
            meta.len(),
            meta.ino(),
        ))
    };
    Some([one(&files.cert)?, one(&files.key)?])
}

impl ResolvesClientCert for ReloadingClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.checked.elapsed() < RELOAD_CHECK {
            return Some(Arc::clone(&state.key));
        }
        state.checked = std::time::Instant::now();
        let now = stamp(&self.files);
        if now.is_some() && now != state.loaded {
            match load_client_cert(&self.files) {
                Ok(key) => {
                    tracing::info!(cert = %self.files.cert.display(), "client certificate reloaded");
                    state.key = Arc::new(key);
                    state.loaded = now;
                    state.failed = None;
                }
                Err(error) => {
                    if state.failed != now {
                        tracing::warn!(%error, "client certificate changed but cannot be loaded: keeping the previous one");
                        state.failed = now;
                    }
                }
            }
        }
        Some(Arc::clone(&state.key))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The configuration for the upstream: `base`, with the client certificate
/// presented when one is configured.
pub fn upstream_config(
    base: &ClientConfig,
    client_cert: Option<&ClientCertFiles>,
) -> Result<ClientConfig, String> {
    match client_cert {
        Some(files) => with_client_cert(base, files),
        None => Ok(base.clone()),
    }
}

/// `base` with the client certificate presented, reloaded on change.
pub fn with_client_cert(
    base: &ClientConfig,
    files: &ClientCertFiles,
) -> Result<ClientConfig, String> {
    let key = load_client_cert(files)?;
    let mut config = base.clone();
    // A resumed TLS session re-uses the identity it was made with: without
    // this, a rotated certificate would only be seen once tickets expired.
    config.resumption = rustls::client::Resumption::disabled();
    config.client_auth_cert_resolver = Arc::new(ReloadingClientCert {
        files: files.clone(),
        state: Mutex::new(ReloadState {
            key: Arc::new(key),
            loaded: stamp(files),
            failed: None,
            checked: std::time::Instant::now(),
        }),
    });
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
