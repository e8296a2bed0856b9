//! A private CA made by the test (rcgen), with server and client
//! certificates signed by it.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

pub struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// A CA and a server certificate for `localhost`.
    pub fn new() -> Result<Self, rcgen::Error> {
        Self::with_server(|_| {})
    }

    /// A CA and a server certificate for `localhost` that expired in 2020.
    pub fn expired() -> Result<Self, rcgen::Error> {
        Self::with_server(|params| {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        })
    }

    fn with_server(adjust: impl FnOnce(&mut CertificateParams)) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        adjust(&mut params);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Pki {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer,
        })
    }

    /// A client certificate signed by the CA.
    pub fn client(&self, name: &str) -> Result<Identity, rcgen::Error> {
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec![name.to_owned()])?.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The CA certificate in a PEM file, as `tls.ca_file` takes it.
    pub fn write_ca(&self) -> std::io::Result<std::path::PathBuf> {
        let path = scratch_dir()?.join("ca.pem");
        std::fs::write(&path, &self.ca_pem)?;
        Ok(path)
    }
}

/// A fresh directory under the system's temporary one.
pub fn scratch_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "bearer-proxy-tls-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs `openssl` in `dir`.
pub fn openssl(dir: &Path, args: &[&str]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    if !output.status.success() {
        return Err(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(())
}

/// Writes a new 2048-bit RSA key, PKCS#8, to `dir/file`.
pub fn rsa_key(dir: &Path, file: &str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            file,
        ],
    )
}

/// A self-signed certificate `name.crt` and its key `name.key`: RSA
/// (PKCS#8, or PKCS#1 with `rsa-pkcs1`) or EC P-256 (SEC1, `ec`).
pub fn make_pair(
    dir: &Path,
    name: &str,
    kind: &str,
) -> Result<(PathBuf, PathBuf), Box<dyn std::error::Error + Send + Sync>> {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    match kind {
        "rsa" => rsa_key(dir, &key)?,
        "rsa-pkcs1" => {
            rsa_key(dir, "tmp.key")?;
            openssl(
                dir,
                &["rsa", "-in", "tmp.key", "-traditional", "-out", &key],
            )?;
        }
        "ec" => openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &key,
            ],
        )?,
        other => return Err(format!("unknown kind {other}").into()),
    }
    let subject = format!("/CN={name}");
    openssl(
        dir,
        &[
            "req", "-x509", "-new", "-key", &key, "-subj", &subject, "-days", "30", "-out", &crt,
        ],
    )?;
    Ok((dir.join(crt), dir.join(key)))
}

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// How a test TLS server is set up.
#[derive(Default)]
pub struct TlsServer<'a> {
    /// ALPN protocols offered (none: HTTP/1.1 by default).
    pub alpn: &'a [&'a [u8]],
    /// Require a client certificate issued by the PKI's CA.
    pub require_client_cert: bool,
}

impl TlsServer<'_> {
    /// Listens on loopback with the PKI's `localhost` certificate and hands
    /// each accepted TLS connection to `handle`.
    pub async fn serve<F, Fut>(
        self,
        pki: &Pki,
        handle: F,
    ) -> Result<std::net::SocketAddr, Box<dyn std::error::Error + Send + Sync>>
    where
        F: Fn(TlsStream) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes())?;
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = if self.require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
                roots.add(ca?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(certs, key)?;
        config.alpn_protocols = self.alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, handle) = (acceptor.clone(), handle.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        handle(tls).await;
                    }
                });
            }
        });
        Ok(addr)
    }
}

/// A TLS front for a plain server: terminates TLS with the PKI's
/// `localhost` certificate and relays the bytes to `target`.
pub async fn tls_front(
    pki: &Pki,
    target: std::net::SocketAddr,
) -> Result<std::net::SocketAddr, Box<dyn std::error::Error + Send + Sync>> {
    TlsServer::default()
        .serve(pki, move |mut tls| async move {
            if let Ok(mut plain) = tokio::net::TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            }
        })
        .await
}
