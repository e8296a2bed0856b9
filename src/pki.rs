//! Certificates and private keys from PEM files: read, checked (the key is
//! the certificate's, the certificate is valid now), signed with, and
//! re-read when the files change. Used for a client certificate presented
//! to the upstream (mTLS) and for the certificate credential's signed
//! assertions. Messages name the files; a key's bytes are never shown.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaKeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate file and its private key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC); not encrypted.
    pub key: PathBuf,
}

/// The kind of a private key, which decides how it signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA, 2048 bits or more.
    Rsa,
    /// EC on P-256.
    EcP256,
    /// EC on P-384.
    EcP384,
}

/// How a signature is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// RSASSA-PSS with SHA-256 (JWS `PS256`).
    RsaPssSha256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (JWS `RS256`).
    RsaPkcs1Sha256,
    /// ECDSA, the curve's own hash, `r || s` (JWS `ES256`, `ES384`).
    Ecdsa,
}

enum Signer {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair, KeyKind),
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is never shown.
        f.write_str(match self {
            Signer::Rsa(_) => "Signer(RSA)",
            Signer::Ec(..) => "Signer(EC)",
        })
    }
}

/// A certificate chain and its key, checked.
#[derive(Debug)]
pub struct Identity {
    /// The chain as read, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The key as rustls signs with it in a TLS handshake: RSA, ECDSA
    /// (P-256, P-384, P-521) or Ed25519.
    tls_key: Arc<dyn rustls::sign::SigningKey>,
    /// The key as an assertion is signed with: RSA, or ECDSA on P-256 or
    /// P-384; `None` for the kinds only TLS takes.
    signer: Option<Signer>,
    /// The leaf's validity, in Unix seconds.
    pub not_before: i64,
    /// The leaf's validity, in Unix seconds.
    pub not_after: i64,
    /// The leaf's X.509 version (1 or 3, in practice).
    pub version: u8,
    /// SHA-256 of the leaf's DER (`x5t#S256`).
    pub sha256: Vec<u8>,
    /// SHA-1 of the leaf's DER (`x5t`, the Windows thumbprint).
    pub sha1: Vec<u8>,
}

impl Identity {
    /// The key's kind, when it can sign an assertion.
    pub fn key_kind(&self) -> Option<KeyKind> {
        match self.signer.as_ref()? {
            Signer::Rsa(_) => Some(KeyKind::Rsa),
            Signer::Ec(_, kind) => Some(*kind),
        }
    }

    /// Signs `message`; `scheme` must suit the key (checked when the
    /// configuration is validated).
    pub fn sign(&self, scheme: Scheme, message: &[u8]) -> Result<Vec<u8>, String> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        match (self.signer.as_ref(), scheme) {
            (Some(Signer::Rsa(key)), Scheme::RsaPssSha256 | Scheme::RsaPkcs1Sha256) => {
                let padding: &'static dyn aws_lc_rs::signature::RsaEncoding =
                    if scheme == Scheme::RsaPssSha256 {
                        &RSA_PSS_SHA256
                    } else {
                        &RSA_PKCS1_SHA256
                    };
                let mut signature = vec![0; key.public_modulus_len()];
                key.sign(padding, &rng, message, &mut signature)
                    .map_err(|_| "the RSA signature failed".to_owned())?;
                Ok(signature)
            }
            (Some(Signer::Ec(key, _)), Scheme::Ecdsa) => key
                .sign(&rng, message)
                .map(|signature| signature.as_ref().to_vec())
                .map_err(|_| "the ECDSA signature failed".to_owned()),
            _ => Err("the key cannot make this kind of signature".to_owned()),
        }
    }

    /// The chain and key in the form rustls presents. The key was
    /// matched with the certificate by `load`, which also takes a version 1
    /// certificate that rustls' own check refuses.
    pub fn certified_key(&self) -> rustls::sign::CertifiedKey {
        rustls::sign::CertifiedKey::new(self.chain.clone(), Arc::clone(&self.tls_key))
    }

    /// When the certificate expires, as RFC 3339.
    pub fn expires(&self) -> String {
        rfc3339(self.not_after)
    }
}

/// Reads a certificate and its key and checks them at `now`: both parse,
/// the key is not encrypted, the key is the certificate's, and the
/// certificate is valid. Each message names both files.
pub fn load(files: &CertFiles, now: SystemTime) -> Result<Identity, String> {
    let (cert, key) = (files.cert.display(), files.key.display());
    let cert_bytes = std::fs::read(&files.cert).map_err(|e| format!("cannot read {cert}: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(&cert_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert} is not a PEM certificate chain: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err(format!(
            "{cert} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)"
        ));
    };
    let parsed = parse_certificate(leaf)
        .map_err(|e| format!("the first certificate in {cert} cannot be read: {e}"))?;
    let key_bytes = std::fs::read(&files.key).map_err(|e| format!("cannot read {key}: {e}"))?;
    if is_encrypted(&key_bytes) {
        return Err(format!(
            "the private key in {key} is encrypted, and the proxy takes an unencrypted key (protect the file instead, \
             readable only by the proxy's user): decrypt it with `openssl pkey -in {key} -out key.pem` \
             (it asks for the passphrase)"
        ));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        format!("{key} holds no PEM private key (expected PKCS#8, PKCS#1 or SEC1): {e}")
    })?;
    let tls_key = rustls::crypto::aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(key_der.clone_key())
        .map_err(|e| {
            format!(
                "the private key in {key} is not a supported key (RSA of 2048 bits or more, EC on P-256, \
                 P-384 or P-521, or Ed25519): {e}"
            )
        })?;
    let signer = signer(&key_der);
    let matches = match (tls_key.public_key(), &signer) {
        (Some(spki), _) => spki.as_ref() == parsed.spki,
        (None, Some(Signer::Rsa(k))) => k.public_key().as_ref() == parsed.public_key,
        (None, Some(Signer::Ec(k, _))) => k.public_key().as_ref() == parsed.public_key,
        // Nothing to compare with: the handshake or the provider will say.
        (None, None) => true,
    };
    if !matches {
        return Err(format!(
            "the key in {key} does not belong to the certificate in {cert} (their public keys differ)"
        ));
    }
    let now = unix(now);
    if now < parsed.not_before {
        return Err(format!(
            "the certificate in {cert} (key {key}) is not valid until {} (check this machine's clock)",
            rfc3339(parsed.not_before)
        ));
    }
    if now > parsed.not_after {
        return Err(format!(
            "the certificate in {cert} (key {key}) expired on {}: renew it",
            rfc3339(parsed.not_after)
        ));
    }
    Ok(Identity {
        sha256: aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref())
            .as_ref()
            .to_vec(),
        sha1: aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
            leaf.as_ref(),
        )
        .as_ref()
        .to_vec(),
        not_before: parsed.not_before,
        not_after: parsed.not_after,
        version: parsed.version,
        chain,
        tls_key,
        signer,
    })
}

/// A PKCS#8 `ENCRYPTED PRIVATE KEY`, or a traditional PEM key with
/// `Proc-Type: 4,ENCRYPTED`.
fn is_encrypted(pem: &[u8]) -> bool {
    let has = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    has(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || has(b"Proc-Type: 4,ENCRYPTED")
}

/// The assertion signer for `key`, if it is of a kind that signs one.
fn signer(key: &PrivateKeyDer<'_>) -> Option<Signer> {
    let ec = |der: &[u8]| {
        EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map(|k| Signer::Ec(k, KeyKind::EcP256))
            .or_else(|_| {
                EcdsaKeyPair::from_private_key_der(&ECDSA_P384_SHA384_FIXED_SIGNING, der)
                    .map(|k| Signer::Ec(k, KeyKind::EcP384))
            })
    };
    match key {
        PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der())
            .map(Signer::Rsa)
            .ok(),
        PrivateKeyDer::Sec1(der) => ec(der.secret_sec1_der()).ok(),
        PrivateKeyDer::Pkcs8(der) => {
            let der = der.secret_pkcs8_der();
            RsaKeyPair::from_pkcs8(der)
                .map(Signer::Rsa)
                .or_else(|_| ec(der))
                .ok()
        }
        _ => None,
    }
}

/// What is read from a certificate: validity, version, public key.
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    version: u8,
    not_before: i64,
    not_after: i64,
    /// The subjectPublicKey bits: `RSAPublicKey` DER, or an EC point.
    public_key: Vec<u8>,
    /// The whole SubjectPublicKeyInfo, as DER.
    spki: Vec<u8>,
}

/// Reads the few fields needed from a DER certificate (RFC 5280 §4.1).
fn parse_certificate(der: &[u8]) -> Result<Parsed, &'static str> {
    const SEQUENCE: u8 = 0x30;
    let mut outer = Der(der);
    let mut certificate = Der(outer.expect(SEQUENCE)?);
    let mut tbs = Der(certificate.expect(SEQUENCE)?);
    let mut version = 1;
    if tbs.peek() == Some(0xa0) {
        let mut explicit = Der(tbs.expect(0xa0)?);
        version = match explicit.expect(0x02)? {
            [v] if *v <= 2 => v + 1,
            _ => return Err("an unknown version"),
        };
    }
    tbs.expect(0x02)?; // serialNumber
    tbs.expect(SEQUENCE)?; // signature
    tbs.expect(SEQUENCE)?; // issuer
    let mut validity = Der(tbs.expect(SEQUENCE)?);
    let not_before = validity.time()?;
    let not_after = validity.time()?;
    tbs.expect(SEQUENCE)?; // subject
    let before = tbs.0;
    let spki_content = tbs.expect(SEQUENCE)?;
    let spki_der = before[..before.len() - tbs.0.len()].to_vec();
    let mut spki = Der(spki_content);
    spki.expect(SEQUENCE)?; // algorithm
    let public_key = match spki.expect(0x03)? {
        [0, bits @ ..] => bits.to_vec(),
        _ => return Err("a malformed public key"),
    };
    Ok(Parsed {
        version,
        not_before,
        not_after,
        public_key,
        spki: spki_der,
    })
}

/// A DER reader over the rest of a constructed value.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn peek(&self) -> Option<u8> {
        self.0.first().copied()
    }

    /// The content of the next value, which must have tag `tag`.
    fn expect(&mut self, tag: u8) -> Result<&'a [u8], &'static str> {
        let (found, content) = self.next()?;
        if found == tag {
            Ok(content)
        } else {
            Err("not an X.509 certificate (unexpected DER)")
        }
    }

    fn next(&mut self) -> Result<(u8, &'a [u8]), &'static str> {
        const BAD: &str = "not an X.509 certificate (truncated DER)";
        let (&tag, rest) = self.0.split_first().ok_or(BAD)?;
        let (&first, mut rest) = rest.split_first().ok_or(BAD)?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return Err(BAD);
            }
            let (bytes, after) = rest.split_at(count);
            rest = after;
            bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b))
        };
        if rest.len() < len {
            return Err(BAD);
        }
        let (content, after) = rest.split_at(len);
        self.0 = after;
        Ok((tag, content))
    }

    /// A UTCTime or GeneralizedTime, in Unix seconds.
    fn time(&mut self) -> Result<i64, &'static str> {
        const BAD: &str = "a malformed validity time";
        let (tag, content) = self.next()?;
        let text = std::str::from_utf8(content).map_err(|_| BAD)?;
        let digits = text.strip_suffix('Z').ok_or(BAD)?;
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BAD);
        }
        let num = |range: std::ops::Range<usize>| -> Result<i64, &'static str> {
            digits
                .get(range)
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or(BAD)
        };
        let (year, rest) = match (tag, digits.len()) {
            (0x17, 12) => {
                let yy = num(0..2)?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
            }
            (0x18, 14) => (num(0..4)?, 4),
            _ => return Err(BAD),
        };
        let month = num(rest..rest + 2)?;
        let day = num(rest + 2..rest + 4)?;
        let hour = num(rest + 4..rest + 6)?;
        let minute = num(rest + 6..rest + 8)?;
        let second = num(rest + 8..rest + 10)?;
        if !(1..=12).contains(&month)
            || !(1..=31).contains(&day)
            || hour > 23
            || minute > 59
            || second > 60
        {
            return Err(BAD);
        }
        Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn unix(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Unix seconds as RFC 3339, UTC; outside 1970 to 9999 (which the
/// formatter takes), the number.
fn rfc3339(secs: i64) -> String {
    if !(0..=253_402_300_799).contains(&secs) {
        return format!("{secs} (Unix time)");
    }
    let time = UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs());
    humantime::format_rfc3339_seconds(time).to_string()
}

/// What identifies a version of the two files: modification and change
/// times (a chmod changes only the latter), length, inode.
type FileStamp = [(SystemTime, i64, u64, u64); 2];

fn stamp(files: &CertFiles) -> Option<FileStamp> {
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

/// Something made from a pair of files, made again when the files change
/// on disk, so a rotated certificate needs no restart. The files are looked
/// at no more often than `every`; a pair that fails to load (half-written,
/// mismatched, expired, unreadable) leaves the previous one in use, is
/// warned about once, and is tried again at the next look.
#[derive(Debug)]
pub struct Reloading<T> {
    files: CertFiles,
    what: &'static str,
    every: Duration,
    make: fn(&CertFiles) -> Result<T, String>,
    state: Mutex<ReloadState<T>>,
}

#[derive(Debug)]
struct ReloadState<T> {
    current: Arc<T>,
    /// The files as they were when `current` was made.
    loaded: Option<FileStamp>,
    /// The files as they were at the last failed load.
    failed: Option<FileStamp>,
    checked: Instant,
}

impl<T> Reloading<T> {
    /// Makes the first value, or says why it cannot. `what` names it in
    /// the log ("client certificate"); the files are looked at again no
    /// more often than `every`.
    pub fn new(
        files: CertFiles,
        what: &'static str,
        every: Duration,
        make: fn(&CertFiles) -> Result<T, String>,
    ) -> Result<Self, String> {
        let loaded = stamp(&files);
        let current = Arc::new(make(&files)?);
        Ok(Self {
            state: Mutex::new(ReloadState {
                current,
                loaded,
                failed: None,
                checked: Instant::now(),
            }),
            files,
            what,
            every,
            make,
        })
    }

    /// The files.
    pub fn files(&self) -> &CertFiles {
        &self.files
    }

    /// The value in use, without looking at the files (for display).
    pub fn peek(&self) -> Arc<T> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(&state.current)
    }

    /// The value made from the files as they are now, or the last good one.
    pub fn current(&self) -> Arc<T> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.checked.elapsed() < self.every {
            return Arc::clone(&state.current);
        }
        state.checked = Instant::now();
        let now = stamp(&self.files);
        if now.is_some() && now != state.loaded {
            match (self.make)(&self.files) {
                Ok(value) => {
                    tracing::info!(cert = %self.files.cert.display(), "{} reloaded", self.what);
                    state.current = Arc::new(value);
                    state.loaded = now;
                    state.failed = None;
                }
                Err(error) => {
                    if state.failed != now {
                        tracing::warn!(%error, "{} changed but cannot be loaded: keeping the previous one", self.what);
                        state.failed = now;
                    }
                }
            }
        }
        Arc::clone(&state.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 12, 6), 20_793);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }

    #[test]
    fn times() {
        let utc = |s: &str| Der(&[&[0x17, s.len() as u8], s.as_bytes()].concat()).time();
        let gen_ = |s: &str| Der(&[&[0x18, s.len() as u8], s.as_bytes()].concat()).time();
        assert_eq!(utc("700101000000Z"), Ok(0));
        assert_eq!(utc("491231235959Z"), Ok(2_524_607_999));
        assert_eq!(gen_("20500101000000Z"), Ok(2_524_608_000));
        assert!(utc("7001010000Z").is_err());
        assert!(utc("700101000000+0100").is_err());
        assert!(gen_("2050130100000Z").is_err());
    }

    #[test]
    fn times_outside_what_the_formatter_takes_are_numbers() {
        assert_eq!(rfc3339(-1), "-1 (Unix time)");
        assert_eq!(rfc3339(253_402_300_800), "253402300800 (Unix time)");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn truncated_der_is_an_error_not_a_panic() {
        let mut der = Vec::new();
        for n in 0..64u8 {
            der.push(n.wrapping_mul(37));
            let _ = parse_certificate(&der);
            let _ = parse_certificate(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]);
            let _ = parse_certificate(&[0x30, 0x80]);
        }
    }
}
