//! Validation: raw text into the types the engine uses, the one place
//! where each key is checked. Every error names the key, where its value
//! came from, and the key table's expected form.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use http::uri::Scheme;
use http::{HeaderValue, Uri};

use super::parse::{
    parse_bool, parse_duration, parse_key, parse_list, parse_with, reject_credentials, trim_secret,
};
use super::sources::{Environment, Flags, Origin, RawConfig, RawValue};
use super::types::{
    AccessLog, Config, ConfigError, GuardConfig, ListenAddr, LogFormat, ProxyConfig, TlsConfig,
    TokenConfig, UpstreamConfig, UpstreamUrl,
};

impl Config {
    /// Loads and validates the configuration from every source.
    pub fn load(flags: &Flags, env: &(impl Environment + ?Sized)) -> Result<Self, ConfigError> {
        Self::from_raw(&RawConfig::load(flags, env)?)
    }

    /// Validates raw values: the one place where each key is checked.
    pub fn from_raw(raw: &RawConfig) -> Result<Self, ConfigError> {
        let user_agent = match raw.get("upstream.user_agent") {
            Some(v) => parse_with(v, "upstream.user_agent", |s| HeaderValue::from_str(s).ok())?,
            None => HeaderValue::from_static(concat!("bearer-proxy/", env!("CARGO_PKG_VERSION"))),
        };
        let upstream = UpstreamConfig {
            url: parse_upstream_url(raw.require("upstream.url")?)?,
            user_agent,
            status_path: parse_key(raw, "upstream.status_path", |s| {
                (s.starts_with('/') && s.parse::<Uri>().is_ok()).then(|| s.to_owned())
            })?,
            connect_timeout: parse_duration(raw, "upstream.connect_timeout")?,
            response_timeout: parse_duration(raw, "upstream.response_timeout")?,
            client_cert: client_cert(raw)?,
            keep_warm: parse_bool(raw, "upstream.keep_warm")?,
            http2: parse_bool(raw, "upstream.http2")?,
        };
        let tls = TlsConfig {
            ca_file: raw.get("tls.ca_file").map(|v| PathBuf::from(&v.value)),
        };
        if let (Some(path), Some(v)) = (&tls.ca_file, raw.get("tls.ca_file")) {
            crate::tls::read_ca_file(path).map_err(|e| {
                ConfigError::new(format!("{}: {e}", Origin("tls.ca_file", &v.source)))
            })?;
        }
        let scope = parse_key(raw, "token.scope", |s| match s.trim() {
            "" => None,
            "none" => Some(None),
            scope => Some(Some(scope.to_owned())),
        })?;
        let chosen = super::credential::choose(raw, scope.as_deref())?;
        let token = TokenConfig {
            url: chosen.url,
            client_id: chosen.client_id,
            credential: chosen.credential,
            credential_reason: chosen.reason,
            scope,
            extra_params: parse_list(raw, "token.extra_params", |item| {
                let (name, value) = item.split_once('=')?;
                let name = name.trim();
                let reserved = [
                    "grant_type",
                    "scope",
                    "client_id",
                    "client_secret",
                    "client_assertion",
                    "client_assertion_type",
                ];
                let valid = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
                    && !reserved.contains(&name);
                valid.then(|| format!("{name}={}", value.trim()))
            })?
            .into_iter()
            .filter_map(|item| {
                let (name, value) = item.split_once('=')?;
                Some((name.to_owned(), value.to_owned()))
            })
            .collect(),
            timeout: parse_duration(raw, "token.timeout")?,
            startup_wait: parse_duration(raw, "token.startup_wait")?,
            refresh_before: match raw.get("token.refresh_before") {
                Some(_) => Some(parse_duration(raw, "token.refresh_before")?),
                None => None,
            },
            retry_initial: parse_duration(raw, "token.retry_initial")?,
            retry_max: parse_duration(raw, "token.retry_max")?,
            min_forced_interval: parse_duration(raw, "token.min_forced_interval")?,
        };
        if token.retry_initial > token.retry_max {
            let v = raw.require("token.retry_max")?;
            return Err(ConfigError::new(format!(
                "{}: expected at least token.retry_initial ({}), got {:?}",
                Origin("token.retry_max", &v.source),
                humantime::format_duration(token.retry_initial),
                v.value
            )));
        }
        let proxy = ProxyConfig {
            replay_buffer: parse_size(raw, "proxy.replay_buffer")?,
            max_concurrent: parse_key(raw, "proxy.max_concurrent", |s| {
                s.parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1_000_000).contains(n))
            })?,
            workers: parse_key(raw, "proxy.workers", |s| {
                if s.eq_ignore_ascii_case("auto") {
                    Some(std::thread::available_parallelism().map_or(1, usize::from))
                } else {
                    s.parse::<usize>().ok().filter(|n| (1..=256).contains(n))
                }
            })?,
            header_timeout: parse_duration(raw, "proxy.header_timeout")?,
            tunnel_idle_timeout: parse_duration(raw, "proxy.tunnel_idle_timeout")?,
            mask_token_in: parse_list(raw, "proxy.mask_token_in", |item| {
                item.starts_with('/').then(|| item.to_owned())
            })?,
        };
        let guard = GuardConfig {
            allowed_hosts: parse_list(raw, "guard.allowed_hosts", |item| {
                let valid = item == "*"
                    || item.chars().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '[' | ']' | '_')
                    });
                valid.then(|| item.to_ascii_lowercase())
            })?,
            allowed_origins: parse_list(raw, "guard.allowed_origins", |item| {
                let valid =
                    item == "*" || item.starts_with("http://") || item.starts_with("https://");
                valid.then(|| item.trim_end_matches('/').to_ascii_lowercase())
            })?,
            local_key: match raw.get("guard.local_key_file") {
                None => None,
                Some(v) => Some(read_local_key(v)?),
            },
        };
        Ok(Config {
            listen: parse_proxy_listen(raw)?,
            socket_mode: parse_key(raw, "socket_mode", |s| {
                u32::from_str_radix(s, 8).ok().filter(|mode| *mode <= 0o777)
            })?,
            admin_listen: parse_listen(raw, "admin_listen")?,
            upstream,
            tls,
            token,
            proxy,
            guard,
            proxies: checked_proxies(&raw.proxies)?,
            shutdown_grace: parse_duration(raw, "shutdown.grace")?,
            log_format: parse_log_format(raw.require("log.format")?)?,
            access_log: AccessLog {
                on: parse_bool(raw, "log.access")?,
                query: parse_bool(raw, "log.access_query")?,
            },
        })
    }
}

/// The admin address alone: `healthcheck` needs nothing else, so it works
/// even where the credentials are not set.
pub fn admin_listen(
    flags: &Flags,
    env: &(impl Environment + ?Sized),
) -> Result<SocketAddr, ConfigError> {
    parse_listen(&RawConfig::load(flags, env)?, "admin_listen")
}

fn parse_log_format(v: &RawValue) -> Result<LogFormat, ConfigError> {
    parse_with(v, "log.format", |s| match s {
        "text" => Some(LogFormat::Text),
        "json" => Some(LogFormat::Json),
        _ => None,
    })
}

fn read_local_key(v: &RawValue) -> Result<crate::secret::LocalKey, ConfigError> {
    let path = PathBuf::from(&v.value);
    let content = std::fs::read_to_string(&path).map_err(|e| {
        ConfigError::new(format!(
            "{}: cannot read {}: {e}; expected a readable file holding the local key",
            Origin("guard.local_key_file", &v.source),
            path.display()
        ))
    })?;
    let key = trim_secret(&content);
    if key.len() < 16 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(format!(
            "{}: the key in {} must be at least 16 printable characters without spaces",
            Origin("guard.local_key_file", &v.source),
            path.display()
        )));
    }
    Ok(crate::secret::LocalKey::new(key))
}

/// The largest size any key takes.
const MAX_SIZE: u64 = 16 * 1024 * 1024;

/// A size such as `"64KiB"`, `"1MiB"`, `"64KB"` or `"65536"` (bytes).
fn parse_size(raw: &RawConfig, key: &'static str) -> Result<usize, ConfigError> {
    let v = raw.require(key)?;
    parse_with(v, key, |s| {
        let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(digits);
        let unit_bytes: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1024,
            "MiB" => 1024 * 1024,
            "KB" | "kB" => 1000,
            "MB" => 1000 * 1000,
            _ => return None,
        };
        let bytes = number.parse::<u64>().ok()?.checked_mul(unit_bytes)?;
        (bytes <= MAX_SIZE)
            .then(|| usize::try_from(bytes).ok())
            .flatten()
    })
}

fn parse_proxy_listen(raw: &RawConfig) -> Result<ListenAddr, ConfigError> {
    let v = raw.require("listen")?;
    if let Some(path) = v.value.trim().strip_prefix("unix:") {
        return parse_with(v, "listen", |_| {
            path.starts_with('/')
                .then(|| ListenAddr::Unix(PathBuf::from(path)))
        });
    }
    parse_listen(raw, "listen").map(ListenAddr::Tcp)
}

fn parse_listen(raw: &RawConfig, key: &'static str) -> Result<SocketAddr, ConfigError> {
    let v = raw.require(key)?;
    if v.value.starts_with("unix:") {
        return Err(ConfigError::new(format!(
            "{}: a unix socket is only supported for listen; expected host:port such as \"127.0.0.1:9090\"",
            Origin(key, &v.source)
        )));
    }
    parse_with(v, key, |s| {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Some(addr);
        }
        let port = s.strip_prefix("localhost:")?.parse::<u16>().ok()?;
        Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
    })
}

fn parse_upstream_url(v: &RawValue) -> Result<UpstreamUrl, ConfigError> {
    reject_credentials(v, "upstream.url")?;
    parse_with(v, "upstream.url", |s| {
        let uri: Uri = s.parse().ok()?;
        let scheme = uri.scheme()?.clone();
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return None;
        }
        let authority = uri.authority()?.clone();
        if authority.as_str().contains('@') || authority.host().is_empty() || uri.query().is_some()
        {
            return None;
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        Some(UpstreamUrl {
            scheme,
            authority,
            base_path,
        })
    })
}

/// `upstream.client_cert_file` and `upstream.client_key_file`: both or
/// neither, and a key that belongs to the certificate.
fn client_cert(raw: &RawConfig) -> Result<Option<crate::pki::CertFiles>, ConfigError> {
    let cert = raw.get("upstream.client_cert_file");
    let key = raw.get("upstream.client_key_file");
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(v), None) | (None, Some(v)) => {
            return Err(ConfigError::new(format!(
                "upstream.client_cert_file and upstream.client_key_file must be set together; only one is ({})",
                Origin(
                    if cert.is_some() {
                        "upstream.client_cert_file"
                    } else {
                        "upstream.client_key_file"
                    },
                    &v.source
                )
            )));
        }
    };
    let files = crate::pki::CertFiles {
        cert: PathBuf::from(&cert.value),
        key: PathBuf::from(&key.value),
    };
    crate::tls::load_client_cert(&files).map_err(|e| {
        ConfigError::new(format!(
            "{} and {}: {e}",
            Origin("upstream.client_cert_file", &cert.source),
            Origin("upstream.client_key_file", &key.source)
        ))
    })?;
    Ok(Some(files))
}

/// Proxy URLs normalised as curl reads them (see `egress::normalize`); the
/// value is never echoed, since it may carry credentials.
fn checked_proxies(
    proxies: &crate::egress::Proxies,
) -> Result<crate::egress::Proxies, ConfigError> {
    let check = |name: &str, url: &Option<crate::secret::ProxyUrl>| match url {
        None => Ok(None),
        Some(url) => crate::egress::normalize(url).map(Some).map_err(|e| {
            ConfigError::new(format!(
                "{name} (or its lower-case form): {e} (the value is not shown)"
            ))
        }),
    };
    Ok(crate::egress::Proxies::new(
        check("HTTP_PROXY", &proxies.http)?,
        check("HTTPS_PROXY", &proxies.https)?,
        proxies.no_proxy.clone(),
    ))
}
