//! Configuration: the table of keys, where each value comes from (flag >
//! environment > file > default), and validation into the typed [`Config`].
//!
//! Loading is two steps, as rust-rpxy does it: every source is first read into
//! one map of raw strings that remembers where each value came from, then
//! [`Config::from_raw`] validates each key once, so every error names the key,
//! the variable or flag that set it, and the expected form. The environment is
//! read through the [`Environment`] trait, so tests pass a map and never touch
//! the process environment.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};

use crate::secret::{ClientSecret, ProxyUrl};

/// Default proxy listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default mode of a unix socket listener: the owner only.
pub const DEFAULT_SOCKET_MODE: &str = "0600";
/// Default admin listen address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Default upstream: the Kalibrate Data API sandpit.
pub const DEFAULT_UPSTREAM: &str = "https://dev.data.thekalibratecloud.com";
/// Default status path, called by `check` and masked in responses.
pub const DEFAULT_STATUS_PATH: &str = "/api/status";
/// Default TCP connect timeout to the upstream.
pub const DEFAULT_CONNECT_TIMEOUT: &str = "10s";
/// Default wait for the upstream's response headers (Kalibrate's guide uses 60 s).
pub const DEFAULT_RESPONSE_TIMEOUT: &str = "60s";
/// Default tenant: Kalibrate's non-production tenant.
pub const DEFAULT_TENANT_ID: &str = "efa98c7b-2114-46e8-be99-954a4f1a2d9c";
/// Default scope: the audience that the sandpit's status endpoint reports.
pub const DEFAULT_SCOPE: &str =
    "api://dev.data.thekalibratecloud.com/c770a337-3c7e-4bbe-a8cb-2fbc9601b94f/.default";
/// Default client authentication at the token endpoint.
pub const DEFAULT_AUTH_METHOD: &str = "client_secret_post";
/// Default timeout of one token request.
pub const DEFAULT_TOKEN_TIMEOUT: &str = "30s";
/// Default time a request waits for the first token.
pub const DEFAULT_STARTUP_WAIT: &str = "10s";
/// Default delay after a first failed token request.
pub const DEFAULT_RETRY_INITIAL: &str = "5s";
/// Default longest delay between token requests after failures.
pub const DEFAULT_RETRY_MAX: &str = "5m";
/// Default least time between two renewals forced by an upstream 401.
pub const DEFAULT_MIN_FORCED_INTERVAL: &str = "30s";
/// Default largest request body held back so it can be replayed after a 401.
pub const DEFAULT_REPLAY_BUFFER: &str = "64KiB";
/// Default limit on requests in flight.
pub const DEFAULT_MAX_CONCURRENT: &str = "1024";
/// Default for `proxy.workers`: one thread, as nginx's and linkerd2-proxy's
/// defaults. A busy thread serves a request with less CPU than several
/// half-idle ones, which sleep and are woken far more often (README,
/// "Performance"); `auto` is for the rare proxy that needs several cores.
pub const DEFAULT_WORKERS: &str = "1";
/// Default time a client has to send a request's headers.
pub const DEFAULT_HEADER_TIMEOUT: &str = "10s";
/// Default paths whose JSON answers have the token masked.
pub const DEFAULT_MASK_TOKEN_IN: &str = "/api/status";
/// Default time in-flight requests get to finish at shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: &str = "30s";
/// Default log format.
pub const DEFAULT_LOG_FORMAT: &str = "text";

/// The config file read when present and no other is named (the container
/// image's place for a mounted config).
pub const DEFAULT_CONFIG_FILE: &str = "/etc/bearer-proxy/bearer-proxy.toml";
/// The variable that names the config file.
pub const ENV_CONFIG: &str = "BEARER_PROXY_CONFIG";
/// The only place a literal client secret is read from.
pub const ENV_CLIENT_SECRET: &str = "API_CLIENT_SECRET";
/// Prefix of the generic `BEARER_PROXY_SECTION_KEY` variables.
pub const ENV_PREFIX: &str = "BEARER_PROXY_";

/// One configuration key: its name, the flag and named variables that set it,
/// its default, and what a valid value looks like (for error messages).
#[derive(Debug)]
struct KeySpec {
    key: &'static str,
    flag: Option<&'static str>,
    /// Named variables, checked before the generic `BEARER_PROXY_SECTION_KEY`.
    env: &'static [&'static str],
    default: Option<&'static str>,
}

const KEYS: &[KeySpec] = &[
    KeySpec {
        key: "listen",
        flag: Some("--listen"),
        env: &[],
        default: Some(DEFAULT_LISTEN),
    },
    KeySpec {
        key: "socket_mode",
        flag: None,
        env: &[],
        default: Some(DEFAULT_SOCKET_MODE),
    },
    KeySpec {
        key: "admin_listen",
        flag: Some("--admin-listen"),
        env: &[],
        default: Some(DEFAULT_ADMIN_LISTEN),
    },
    KeySpec {
        key: "upstream.url",
        flag: Some("--upstream"),
        env: &["BEARER_PROXY_UPSTREAM"],
        default: Some(DEFAULT_UPSTREAM),
    },
    KeySpec {
        key: "upstream.user_agent",
        flag: Some("--user-agent"),
        env: &["BEARER_PROXY_USER_AGENT"],
        default: None,
    },
    KeySpec {
        key: "upstream.status_path",
        flag: None,
        env: &[],
        default: Some(DEFAULT_STATUS_PATH),
    },
    KeySpec {
        key: "upstream.connect_timeout",
        flag: None,
        env: &[],
        default: Some(DEFAULT_CONNECT_TIMEOUT),
    },
    KeySpec {
        key: "upstream.response_timeout",
        flag: None,
        env: &[],
        default: Some(DEFAULT_RESPONSE_TIMEOUT),
    },
    KeySpec {
        key: "upstream.client_cert_file",
        flag: None,
        env: &[],
        default: None,
    },
    KeySpec {
        key: "upstream.client_key_file",
        flag: None,
        env: &[],
        default: None,
    },
    KeySpec {
        key: "tls.ca_file",
        flag: None,
        env: &[],
        default: None,
    },
    KeySpec {
        key: "token.url",
        flag: Some("--token-url"),
        env: &["API_TOKEN_URL"],
        default: None,
    },
    KeySpec {
        key: "token.tenant_id",
        flag: Some("--tenant-id"),
        env: &["API_TENANT_ID"],
        default: Some(DEFAULT_TENANT_ID),
    },
    KeySpec {
        key: "token.client_id",
        flag: None,
        env: &["API_CLIENT_ID"],
        default: None,
    },
    KeySpec {
        key: "token.client_secret_file",
        flag: None,
        env: &["API_CLIENT_SECRET_FILE"],
        default: None,
    },
    KeySpec {
        key: "token.scope",
        flag: Some("--scope"),
        env: &["API_SCOPE"],
        default: Some(DEFAULT_SCOPE),
    },
    KeySpec {
        key: "token.auth_method",
        flag: None,
        env: &[],
        default: Some(DEFAULT_AUTH_METHOD),
    },
    KeySpec {
        key: "token.timeout",
        flag: None,
        env: &[],
        default: Some(DEFAULT_TOKEN_TIMEOUT),
    },
    KeySpec {
        key: "token.startup_wait",
        flag: None,
        env: &[],
        default: Some(DEFAULT_STARTUP_WAIT),
    },
    KeySpec {
        key: "token.refresh_before",
        flag: None,
        env: &[],
        default: None,
    },
    KeySpec {
        key: "token.retry_initial",
        flag: None,
        env: &[],
        default: Some(DEFAULT_RETRY_INITIAL),
    },
    KeySpec {
        key: "token.retry_max",
        flag: None,
        env: &[],
        default: Some(DEFAULT_RETRY_MAX),
    },
    KeySpec {
        key: "token.min_forced_interval",
        flag: None,
        env: &[],
        default: Some(DEFAULT_MIN_FORCED_INTERVAL),
    },
    KeySpec {
        key: "proxy.replay_buffer",
        flag: None,
        env: &[],
        default: Some(DEFAULT_REPLAY_BUFFER),
    },
    KeySpec {
        key: "proxy.max_concurrent",
        flag: None,
        env: &[],
        default: Some(DEFAULT_MAX_CONCURRENT),
    },
    KeySpec {
        key: "proxy.workers",
        flag: None,
        env: &[],
        default: Some(DEFAULT_WORKERS),
    },
    KeySpec {
        key: "proxy.header_timeout",
        flag: None,
        env: &[],
        default: Some(DEFAULT_HEADER_TIMEOUT),
    },
    KeySpec {
        key: "proxy.mask_token_in",
        flag: None,
        env: &[],
        default: Some(DEFAULT_MASK_TOKEN_IN),
    },
    KeySpec {
        key: "guard.allowed_hosts",
        flag: None,
        env: &[],
        default: None,
    },
    KeySpec {
        key: "guard.allowed_origins",
        flag: None,
        env: &[],
        default: None,
    },
    KeySpec {
        key: "guard.local_key_file",
        flag: None,
        env: &[],
        default: None,
    },
    KeySpec {
        key: "shutdown.grace",
        flag: None,
        env: &[],
        default: Some(DEFAULT_SHUTDOWN_GRACE),
    },
    KeySpec {
        key: "log.format",
        flag: Some("--log-format"),
        env: &[],
        default: Some(DEFAULT_LOG_FORMAT),
    },
];

/// Keys whose value is a list: a TOML array, or comma-separated elsewhere.
const LIST_KEYS: &[&str] = &[
    "guard.allowed_hosts",
    "guard.allowed_origins",
    "proxy.mask_token_in",
];

/// Every key the config file may hold, in the order of the table.
pub fn known_keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|spec| spec.key)
}

/// The generic variable of a key: `upstream.url` → `BEARER_PROXY_UPSTREAM_URL`.
pub fn generic_env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Command-line flags shared by every subcommand. Flags never carry a secret.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Flags {
    /// Config file (TOML). Also BEARER_PROXY_CONFIG.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Proxy listen address, host:port.
    #[arg(long, value_name = "ADDR", global = true)]
    pub listen: Option<String>,
    /// Admin listen address (/healthz, /readyz, /status), host:port.
    #[arg(long, value_name = "ADDR", global = true)]
    pub admin_listen: Option<String>,
    /// Upstream base URL that every request is forwarded to.
    #[arg(long, value_name = "URL", global = true)]
    pub upstream: Option<String>,
    /// User-Agent sent to the upstream.
    #[arg(long, value_name = "UA", global = true)]
    pub user_agent: Option<String>,
    /// Token endpoint URL (wins over --tenant-id).
    #[arg(long, value_name = "URL", global = true)]
    pub token_url: Option<String>,
    /// Entra tenant id, used to build the token endpoint URL.
    #[arg(long, value_name = "ID", global = true)]
    pub tenant_id: Option<String>,
    /// OAuth2 scope requested with each token.
    #[arg(long, value_name = "SCOPE", global = true)]
    pub scope: Option<String>,
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT", global = true)]
    pub log_format: Option<String>,
}

impl Flags {
    fn value_of(&self, flag: &str) -> Option<&String> {
        match flag {
            "--listen" => self.listen.as_ref(),
            "--admin-listen" => self.admin_listen.as_ref(),
            "--upstream" => self.upstream.as_ref(),
            "--user-agent" => self.user_agent.as_ref(),
            "--token-url" => self.token_url.as_ref(),
            "--tenant-id" => self.tenant_id.as_ref(),
            "--scope" => self.scope.as_ref(),
            "--log-format" => self.log_format.as_ref(),
            _ => None,
        }
    }
}

/// Read access to the process's surroundings: environment variables, and
/// the config file that is read when none is named.
pub trait Environment {
    /// The variable's value, if set.
    fn var(&self, name: &str) -> Option<OsString>;

    /// The config file to read when neither `--config` nor
    /// `BEARER_PROXY_CONFIG` names one.
    fn default_config_file(&self) -> Option<PathBuf> {
        None
    }
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }

    fn default_config_file(&self) -> Option<PathBuf> {
        let path = PathBuf::from(DEFAULT_CONFIG_FILE);
        path.is_file().then_some(path)
    }
}

impl Environment for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<OsString> {
        self.get(name).map(OsString::from)
    }
}

impl Environment for [(&str, &str)] {
    fn var(&self, name: &str) -> Option<OsString> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| OsString::from(*v))
    }
}

/// A configuration error: names the key or variable and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Flag(&'static str),
}

#[derive(Debug, Clone)]
struct RawValue {
    value: String,
    source: Source,
}

/// What a key's value came from, for error messages: `token.timeout (set by
/// BEARER_PROXY_TOKEN_TIMEOUT)`.
struct Origin<'a>(&'a str, &'a Source);

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Origin(key, source) = self;
        match source {
            Source::Default => write!(f, "{key} (default)"),
            Source::File(path) => write!(f, "{key} (in {})", path.display()),
            Source::Env(name) => write!(f, "{key} (set by {name})"),
            Source::Flag(flag) => write!(f, "{key} (set by {flag})"),
        }
    }
}

/// Every source merged, before validation.
#[derive(Debug, Default)]
pub struct RawConfig {
    values: BTreeMap<&'static str, RawValue>,
    client_secret: Option<ClientSecret>,
    proxies: crate::egress::Proxies,
}

impl RawConfig {
    /// Reads the config file (from `--config` or `BEARER_PROXY_CONFIG`), the
    /// environment and the flags, with the documented precedence.
    pub fn load(flags: &Flags, env: &(impl Environment + ?Sized)) -> Result<Self, ConfigError> {
        let mut raw = RawConfig::default();
        for spec in KEYS {
            if let Some(default) = spec.default {
                raw.set(spec.key, default.to_owned(), Source::Default);
            }
        }
        let file = match &flags.config {
            Some(path) => Some(path.clone()),
            None => env_string(env, ENV_CONFIG)?
                .map(PathBuf::from)
                .or_else(|| env.default_config_file()),
        };
        if let Some(path) = file {
            raw.merge_file(&path)?;
        }
        for spec in KEYS {
            let generic = generic_env_name(spec.key);
            let names = spec
                .env
                .iter()
                .copied()
                .chain(std::iter::once(generic.as_str()));
            for name in names {
                if let Some(value) = env_string(env, name)? {
                    raw.set(spec.key, value, Source::Env(name.to_owned()));
                    break;
                }
            }
        }
        for spec in KEYS {
            if let Some(flag) = spec.flag
                && let Some(value) = flags.value_of(flag)
            {
                raw.set(spec.key, value.clone(), Source::Flag(flag));
            }
        }
        raw.client_secret = env_string(env, ENV_CLIENT_SECRET)?.map(ClientSecret::new);
        raw.proxies = proxies_from_env(env);
        Ok(raw)
    }

    fn set(&mut self, key: &'static str, value: String, source: Source) {
        self.values.insert(key, RawValue { value, source });
    }

    /// Reads a TOML file: tables are sections, every leaf is a string.
    fn merge_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(format!(
                "config file {}: cannot read it: {e}",
                path.display()
            ))
        })?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::new(format!(
                "config file {}: not valid TOML: {}",
                path.display(),
                e.message()
            ))
        })?;
        let mut leaves = Vec::new();
        for (name, value) in table {
            match value {
                toml::Value::Table(section) => {
                    for (leaf, value) in section {
                        leaves.push((format!("{name}.{leaf}"), value));
                    }
                }
                other => leaves.push((name, other)),
            }
        }
        for (name, value) in leaves {
            let Some(spec) = KEYS.iter().find(|spec| spec.key == name) else {
                return Err(ConfigError::new(format!(
                    "config file {}: unknown key `{name}`; known keys: {}",
                    path.display(),
                    known_keys().collect::<Vec<_>>().join(", ")
                )));
            };
            // Leaves are strings, an integer where a count is wanted, or a
            // list of strings (kept comma-joined, as the environment has it).
            let value = match value {
                toml::Value::String(value) => value,
                toml::Value::Integer(number)
                    if matches!(spec.key, "proxy.max_concurrent" | "proxy.workers") =>
                {
                    number.to_string()
                }
                toml::Value::Array(items) if LIST_KEYS.contains(&spec.key) => {
                    let mut list = Vec::new();
                    for item in items {
                        let toml::Value::String(item) = item else {
                            return Err(ConfigError::new(format!(
                                "config file {}: key `{name}` must be a list of strings, got an item {item}",
                                path.display()
                            )));
                        };
                        list.push(item);
                    }
                    list.join(",")
                }
                other => {
                    let expected = if LIST_KEYS.contains(&spec.key) {
                        "a list of strings"
                    } else {
                        "a string (quote it)"
                    };
                    return Err(ConfigError::new(format!(
                        "config file {}: key `{name}` must be {expected}, got {other}",
                        path.display()
                    )));
                }
            };
            self.set(spec.key, value, Source::File(path.to_owned()));
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<&RawValue> {
        self.values.get(key)
    }

    /// A key's value, or an error if a key with a default somehow has none.
    fn require(&self, key: &'static str) -> Result<&RawValue, ConfigError> {
        self.get(key)
            .ok_or_else(|| ConfigError::new(format!("{key} is not set")))
    }
}

/// Reads a variable as UTF-8; an empty value counts as unset, as it does for
/// `docker run -e NAME=` and for compose files' `${NAME}` of an unset variable.
fn env_string(
    env: &(impl Environment + ?Sized),
    name: &str,
) -> Result<Option<String>, ConfigError> {
    match env.var(name) {
        None => Ok(None),
        Some(value) => match value.into_string() {
            Ok(value) if value.is_empty() => Ok(None),
            Ok(value) => Ok(Some(value)),
            Err(_) => Err(ConfigError::new(format!("{name}: expected UTF-8 text"))),
        },
    }
}

/// Forward proxies from `HTTPS_PROXY`/`https_proxy`, `HTTP_PROXY`/`http_proxy`
/// and `NO_PROXY`/`no_proxy` (the lower-case form wins, as in curl), as
/// given: `checked_proxies` normalises them.
fn proxies_from_env(env: &(impl Environment + ?Sized)) -> crate::egress::Proxies {
    let read = |names: [&str; 2]| {
        names.iter().find_map(|name| {
            env.var(name)
                .and_then(|v| v.into_string().ok())
                .filter(|v| !v.trim().is_empty())
        })
    };
    crate::egress::Proxies::new(
        read(["http_proxy", "HTTP_PROXY"]).map(ProxyUrl::new),
        read(["https_proxy", "HTTPS_PROXY"]).map(ProxyUrl::new),
        read(["no_proxy", "NO_PROXY"]),
    )
}

/// How the client proves itself at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `client_secret` in the form body.
    ClientSecretPost,
    /// HTTP Basic with the client id and secret.
    ClientSecretBasic,
}

/// Where the client secret comes from.
#[derive(Debug, Clone)]
pub enum SecretSource {
    /// `API_CLIENT_SECRET`, read once at start.
    Literal(ClientSecret),
    /// A file, read afresh at every token request (rotated secrets need no restart).
    File(PathBuf),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The upstream's base URL, split the way the forwarder uses it.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port as written in the URL.
    pub authority: Authority,
    /// Base path without a trailing slash (`""` for the root).
    pub base_path: String,
}

impl UpstreamUrl {
    /// The URL as configured, normalised: `https://host/base`.
    pub fn as_string(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.base_path)
    }

    /// `scheme://authority/`: what a connection is opened to.
    pub fn origin(&self) -> http::Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        http::Uri::from_parts(parts).unwrap_or_else(|_| http::Uri::from_static("/"))
    }
}

/// Upstream settings.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Base URL.
    pub url: UpstreamUrl,
    /// `User-Agent` sent with every request.
    pub user_agent: HeaderValue,
    /// Path (under the upstream's base) of the status endpoint.
    pub status_path: String,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time allowed between the end of the request and the response headers.
    pub response_timeout: Duration,
    /// Client certificate and key presented to the upstream (mTLS).
    pub client_cert: Option<crate::tls::ClientCertFiles>,
}

/// TLS settings shared by the upstream and the token endpoint.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// PEM bundle added to the system roots.
    pub ca_file: Option<PathBuf>,
}

/// Token endpoint settings.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Token endpoint URL.
    pub url: reqwest::Url,
    /// OAuth2 client id.
    pub client_id: String,
    /// Client secret source.
    pub secret: SecretSource,
    /// Requested scope.
    pub scope: String,
    /// Client authentication method.
    pub auth_method: AuthMethod,
    /// Timeout of one token request.
    pub timeout: Duration,
    /// How long a request waits for the first token.
    pub startup_wait: Duration,
    /// Renew this long before expiry, instead of the built-in rule.
    pub refresh_before: Option<Duration>,
    /// Delay after a first failed token request.
    pub retry_initial: Duration,
    /// Longest delay between failed token requests.
    pub retry_max: Duration,
    /// Least time between two renewals forced by an upstream 401.
    pub min_forced_interval: Duration,
}

/// Forwarding settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Largest request body held back so it can be replayed after a 401.
    pub replay_buffer: usize,
    /// Most requests in flight; past it, 503 `overloaded`.
    pub max_concurrent: usize,
    /// Threads that serve proxied connections, each with its own
    /// single-threaded runtime and upstream connection pool.
    pub workers: usize,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Paths (as the client sends them) whose JSON answers have the token masked.
    pub mask_token_in: Vec<String>,
}

/// Who may use the proxy.
#[derive(Debug, Clone, Default)]
pub struct GuardConfig {
    /// Host names (optionally `name:port`) accepted besides the loopback and
    /// the listen address; `*` accepts any.
    pub allowed_hosts: Vec<String>,
    /// Browser origins (`scheme://host[:port]`) accepted besides the loopback's.
    pub allowed_origins: Vec<String>,
    /// The key clients must send in `X-Proxy-Key`, if one is required.
    pub local_key: Option<crate::secret::LocalKey>,
}

/// The validated configuration that the engine runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Proxy listen address.
    pub listen: ListenAddr,
    /// Mode of the unix socket file, when `listen` is one.
    pub socket_mode: u32,
    /// Admin listen address.
    pub admin_listen: SocketAddr,
    /// Upstream settings.
    pub upstream: UpstreamConfig,
    /// TLS settings.
    pub tls: TlsConfig,
    /// Token settings.
    pub token: TokenConfig,
    /// Forwarding settings.
    pub proxy: ProxyConfig,
    /// Who may use the proxy.
    pub guard: GuardConfig,
    /// Forward proxies (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`).
    pub proxies: crate::egress::Proxies,
    /// Time in-flight requests get at shutdown.
    pub shutdown_grace: Duration,
    /// Log format.
    pub log_format: LogFormat,
}

impl Config {
    /// Loads and validates the configuration from every source.
    pub fn load(flags: &Flags, env: &(impl Environment + ?Sized)) -> Result<Self, ConfigError> {
        Self::from_raw(&RawConfig::load(flags, env)?)
    }

    /// Validates raw values: the one place where each key is checked.
    pub fn from_raw(raw: &RawConfig) -> Result<Self, ConfigError> {
        let user_agent = match raw.get("upstream.user_agent") {
            Some(v) => parse_with(v, "upstream.user_agent", "printable ASCII text", |s| {
                HeaderValue::from_str(s).ok()
            })?,
            None => HeaderValue::from_static(concat!("bearer-proxy/", env!("CARGO_PKG_VERSION"))),
        };
        let upstream = UpstreamConfig {
            url: parse_upstream_url(raw.require("upstream.url")?)?,
            user_agent,
            status_path: parse_with(
                raw.require("upstream.status_path")?,
                "upstream.status_path",
                "a path starting with /, such as \"/api/status\"",
                |s| (s.starts_with('/') && s.parse::<Uri>().is_ok()).then(|| s.to_owned()),
            )?,
            connect_timeout: parse_duration(raw, "upstream.connect_timeout")?,
            response_timeout: parse_duration(raw, "upstream.response_timeout")?,
            client_cert: client_cert(raw)?,
        };
        let tls = TlsConfig {
            ca_file: raw.get("tls.ca_file").map(|v| PathBuf::from(&v.value)),
        };
        if let (Some(path), Some(v)) = (&tls.ca_file, raw.get("tls.ca_file")) {
            crate::tls::read_ca_file(path).map_err(|e| {
                ConfigError::new(format!("{}: {e}", Origin("tls.ca_file", &v.source)))
            })?;
        }
        let token = TokenConfig {
            url: token_url(raw)?,
            client_id: client_id(raw)?,
            secret: secret_source(raw)?,
            scope: parse_with(
                raw.require("token.scope")?,
                "token.scope",
                "a scope such as \"api://app-id/.default\"",
                |s| (!s.trim().is_empty()).then(|| s.to_owned()),
            )?,
            auth_method: parse_with(
                raw.require("token.auth_method")?,
                "token.auth_method",
                "client_secret_post or client_secret_basic",
                |s| match s {
                    "client_secret_post" => Some(AuthMethod::ClientSecretPost),
                    "client_secret_basic" => Some(AuthMethod::ClientSecretBasic),
                    _ => None,
                },
            )?,
            timeout: parse_duration(raw, "token.timeout")?,
            startup_wait: parse_duration_allow_zero(raw, "token.startup_wait")?,
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
            max_concurrent: parse_with(
                raw.require("proxy.max_concurrent")?,
                "proxy.max_concurrent",
                "a whole number from 1 to 1000000",
                |s| {
                    s.parse::<usize>()
                        .ok()
                        .filter(|n| (1..=1_000_000).contains(n))
                },
            )?,
            workers: parse_with(
                raw.require("proxy.workers")?,
                "proxy.workers",
                "\"auto\" (one per CPU) or a whole number from 1 to 256",
                |s| {
                    if s.eq_ignore_ascii_case("auto") {
                        Some(std::thread::available_parallelism().map_or(1, usize::from))
                    } else {
                        s.parse::<usize>().ok().filter(|n| (1..=256).contains(n))
                    }
                },
            )?,
            header_timeout: parse_duration(raw, "proxy.header_timeout")?,
            mask_token_in: parse_list(
                raw,
                "proxy.mask_token_in",
                "paths starting with /",
                |item| item.starts_with('/').then(|| item.to_owned()),
            )?,
        };
        let guard = GuardConfig {
            allowed_hosts: parse_list(
                raw,
                "guard.allowed_hosts",
                "host names such as \"bearer-proxy\" or \"api-proxy:8080\", or *",
                |item| {
                    let valid = item == "*"
                        || item.chars().all(|c| {
                            c.is_ascii_alphanumeric()
                                || matches!(c, '-' | '.' | ':' | '[' | ']' | '_')
                        });
                    valid.then(|| item.to_ascii_lowercase())
                },
            )?,
            allowed_origins: parse_list(
                raw,
                "guard.allowed_origins",
                "origins such as \"https://app.example.com\", or *",
                |item| {
                    let valid =
                        item == "*" || item.starts_with("http://") || item.starts_with("https://");
                    valid.then(|| item.trim_end_matches('/').to_ascii_lowercase())
                },
            )?,
            local_key: match raw.get("guard.local_key_file") {
                None => None,
                Some(v) => Some(read_local_key(v)?),
            },
        };
        Ok(Config {
            listen: parse_proxy_listen(raw)?,
            socket_mode: parse_with(
                raw.require("socket_mode")?,
                "socket_mode",
                "an octal file mode such as \"0600\" or \"0660\"",
                |s| u32::from_str_radix(s, 8).ok().filter(|mode| *mode <= 0o777),
            )?,
            admin_listen: parse_listen(raw, "admin_listen")?,
            upstream,
            tls,
            token,
            proxy,
            guard,
            proxies: checked_proxies(&raw.proxies)?,
            shutdown_grace: parse_duration_allow_zero(raw, "shutdown.grace")?,
            log_format: parse_log_format(raw.require("log.format")?)?,
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
    parse_with(v, "log.format", "text or json", |s| match s {
        "text" => Some(LogFormat::Text),
        "json" => Some(LogFormat::Json),
        _ => None,
    })
}

/// Applies `parse`; on `None`, an error naming the key, its source, the
/// expected form and the value that was given.
fn parse_with<T>(
    v: &RawValue,
    key: &str,
    expected: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, ConfigError> {
    parse(v.value.trim()).ok_or_else(|| {
        ConfigError::new(format!(
            "{}: expected {expected}, got {:?}",
            Origin(key, &v.source),
            shorten(&v.value)
        ))
    })
}

fn shorten(value: &str) -> String {
    const MAX: usize = 80;
    if value.chars().count() <= MAX {
        value.to_owned()
    } else {
        let cut: String = value.chars().take(MAX).collect();
        format!("{cut}…")
    }
}

/// The longest duration any key takes: larger values are typos, and would
/// overflow the clock's arithmetic.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn parse_duration(raw: &RawConfig, key: &'static str) -> Result<Duration, ConfigError> {
    let v = raw.require(key)?;
    let expected =
        "a duration greater than zero and at most a year, such as \"200ms\", \"30s\" or \"5m\"";
    parse_with(v, key, expected, |s| {
        humantime::parse_duration(s)
            .ok()
            .filter(|d| !d.is_zero() && *d <= MAX_DURATION)
    })
}

fn parse_duration_allow_zero(raw: &RawConfig, key: &'static str) -> Result<Duration, ConfigError> {
    let v = raw.require(key)?;
    let expected = "a duration of at most a year, such as \"0s\", \"200ms\" or \"30s\"";
    parse_with(v, key, expected, |s| {
        humantime::parse_duration(s)
            .ok()
            .filter(|d| *d <= MAX_DURATION)
    })
}

/// A comma-separated list; each item trimmed, empty items skipped, each
/// checked by `parse`.
fn parse_list(
    raw: &RawConfig,
    key: &'static str,
    expected: &str,
    parse: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, ConfigError> {
    let Some(v) = raw.get(key) else {
        return Ok(Vec::new());
    };
    v.value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            parse(item).ok_or_else(|| {
                ConfigError::new(format!(
                    "{}: expected {expected}, got {:?}",
                    Origin(key, &v.source),
                    shorten(item)
                ))
            })
        })
        .collect()
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
    parse_with(
        v,
        key,
        "a size of at most 16MiB such as \"64KiB\", \"1MiB\" or \"0\"",
        |s| {
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
        },
    )
}

/// Where the proxy listens: a TCP address or a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `host:port`.
    Tcp(SocketAddr),
    /// `unix:/path`.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

fn parse_proxy_listen(raw: &RawConfig) -> Result<ListenAddr, ConfigError> {
    let v = raw.require("listen")?;
    if let Some(path) = v.value.trim().strip_prefix("unix:") {
        return parse_with(
            v,
            "listen",
            "unix: followed by an absolute path, such as \"unix:/run/bearer-proxy/proxy.sock\"",
            |_| {
                path.starts_with('/')
                    .then(|| ListenAddr::Unix(PathBuf::from(path)))
            },
        );
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
    parse_with(
        v,
        key,
        "host:port with an IP address or localhost, such as \"127.0.0.1:8080\"",
        |s| {
            if let Ok(addr) = s.parse::<SocketAddr>() {
                return Some(addr);
            }
            let port = s.strip_prefix("localhost:")?.parse::<u16>().ok()?;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        },
    )
}

fn parse_upstream_url(v: &RawValue) -> Result<UpstreamUrl, ConfigError> {
    reject_credentials(v, "upstream.url")?;
    parse_with(
        v,
        "upstream.url",
        "an http:// or https:// URL with a host and no query, such as \"https://api.example.com/base\"",
        |s| {
            let uri: Uri = s.parse().ok()?;
            let scheme = uri.scheme()?.clone();
            if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
                return None;
            }
            let authority = uri.authority()?.clone();
            if authority.as_str().contains('@')
                || authority.host().is_empty()
                || uri.query().is_some()
            {
                return None;
            }
            let base_path = uri.path().trim_end_matches('/').to_owned();
            Some(UpstreamUrl {
                scheme,
                authority,
                base_path,
            })
        },
    )
}

/// `upstream.client_cert_file` and `upstream.client_key_file`: both or
/// neither, and a key that belongs to the certificate.
fn client_cert(raw: &RawConfig) -> Result<Option<crate::tls::ClientCertFiles>, ConfigError> {
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
    let files = crate::tls::ClientCertFiles {
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

/// A URL with `user:password` is refused without echoing it: the value holds
/// a credential, and an error message must not print one.
fn reject_credentials(v: &RawValue, key: &str) -> Result<(), ConfigError> {
    let with_credentials = reqwest::Url::parse(v.value.trim())
        .is_ok_and(|url| !url.username().is_empty() || url.password().is_some());
    if with_credentials {
        return Err(ConfigError::new(format!(
            "{}: expected a URL without user:password; the value is not shown since it holds a credential",
            Origin(key, &v.source)
        )));
    }
    Ok(())
}

fn token_url(raw: &RawConfig) -> Result<reqwest::Url, ConfigError> {
    let expected = "an http:// or https:// URL such as \"https://login.example.com/oauth2/token\"";
    if let Some(v) = raw.get("token.url") {
        reject_credentials(v, "token.url")?;
        return parse_with(v, "token.url", expected, |s| {
            let url = reqwest::Url::parse(s).ok()?;
            (matches!(url.scheme(), "http" | "https")
                && url.host().is_some()
                && url.fragment().is_none())
            .then_some(url)
        });
    }
    let tenant = raw.require("token.tenant_id")?;
    parse_with(
        tenant,
        "token.tenant_id",
        "a tenant id (a GUID) or a domain such as \"contoso.onmicrosoft.com\"",
        |s| {
            let valid = !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !valid {
                return None;
            }
            reqwest::Url::parse(&format!(
                "https://login.microsoftonline.com/{s}/oauth2/v2.0/token"
            ))
            .ok()
        },
    )
}

fn client_id(raw: &RawConfig) -> Result<String, ConfigError> {
    match raw.get("token.client_id") {
        Some(v) => parse_with(v, "token.client_id", "the application (client) id", |s| {
            (!s.is_empty()).then(|| s.to_owned())
        }),
        None => Err(ConfigError::new(
            "API_CLIENT_ID is not set: expected the application (client) id that the provider issued \
             (token.client_id in the config file)",
        )),
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
            let path = PathBuf::from(&file.value);
            match std::fs::read_to_string(&path) {
                Ok(content) if !trim_secret(&content).is_empty() => Ok(SecretSource::File(path)),
                Ok(_) => Err(ConfigError::new(format!(
                    "{}: the file {} is empty; expected the client secret's value",
                    Origin("token.client_secret_file", &file.source),
                    path.display()
                ))),
                Err(e) => Err(ConfigError::new(format!(
                    "{}: cannot read {}: {e}; expected a readable file holding the client secret",
                    Origin("token.client_secret_file", &file.source),
                    path.display()
                ))),
            }
        }
        (None, None) => Err(ConfigError::new(format!(
            "no client secret: set {ENV_CLIENT_SECRET} to the secret's value, or API_CLIENT_SECRET_FILE \
             (token.client_secret_file) to a file holding it"
        ))),
    }
}

/// A secret file's content without its trailing newline.
pub fn trim_secret(content: &str) -> &str {
    content.trim_end_matches(['\n', '\r'])
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &[(&str, &str)] = &[("API_CLIENT_ID", "app-id"), ("API_CLIENT_SECRET", "s3cret")];

    fn load(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut all: Vec<(&str, &str)> = BASE.to_vec();
        all.extend_from_slice(env);
        // Later entries win in a map: build it in order.
        let map: HashMap<String, String> = all
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::load(&Flags::default(), &map)
    }

    fn err(env: &[(&str, &str)]) -> String {
        match load(env) {
            Ok(_) => panic!("expected a config error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_target_the_sandpit() -> Result<(), ConfigError> {
        let config = load(&[])?;
        let loopback: SocketAddr = "127.0.0.1:8080"
            .parse()
            .map_err(|_| ConfigError::new("address"))?;
        assert_eq!(config.listen, ListenAddr::Tcp(loopback));
        assert_eq!(config.socket_mode, 0o600);
        assert_eq!(
            config.upstream.url.as_string(),
            "https://dev.data.thekalibratecloud.com"
        );
        assert_eq!(
            config.token.url.as_str(),
            "https://login.microsoftonline.com/efa98c7b-2114-46e8-be99-954a4f1a2d9c/oauth2/v2.0/token"
        );
        assert_eq!(config.token.scope, DEFAULT_SCOPE);
        assert_eq!(config.token.client_id, "app-id");
        assert_eq!(config.upstream.response_timeout, Duration::from_secs(60));
        assert_eq!(config.upstream.connect_timeout, Duration::from_secs(10));
        assert!(matches!(config.token.secret, SecretSource::Literal(_)));
        assert_eq!(config.token.auth_method, AuthMethod::ClientSecretPost);
        assert_eq!(config.token.retry_initial, Duration::from_secs(5));
        assert_eq!(config.token.retry_max, Duration::from_secs(300));
        assert_eq!(config.token.min_forced_interval, Duration::from_secs(30));
        assert_eq!(config.token.refresh_before, None);
        assert_eq!(config.proxy.replay_buffer, 64 * 1024);
        Ok(())
    }

    #[test]
    fn flag_beats_env_beats_default() -> Result<(), ConfigError> {
        let env: HashMap<String, String> = [
            ("API_CLIENT_ID", "a"),
            ("API_CLIENT_SECRET", "b"),
            ("API_SCOPE", "env-scope"),
            ("BEARER_PROXY_UPSTREAM", "http://127.0.0.1:1/env"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let flags = Flags {
            scope: Some("flag-scope".into()),
            ..Flags::default()
        };
        let config = Config::load(&flags, &env)?;
        assert_eq!(config.token.scope, "flag-scope");
        assert_eq!(config.upstream.url.base_path, "/env");
        Ok(())
    }

    #[test]
    fn env_beats_file_beats_default() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("bearer-proxy-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("precedence.toml");
        std::fs::write(&file, "[token]\nscope = \"file-scope\"\ntimeout = \"7s\"\n")?;
        let flags = Flags {
            config: Some(file),
            ..Flags::default()
        };
        let env = [
            ("API_CLIENT_ID", "a"),
            ("API_CLIENT_SECRET", "b"),
            ("API_SCOPE", "env-scope"),
        ];
        let config = Config::load(&flags, &env[..])?;
        assert_eq!(config.token.scope, "env-scope");
        assert_eq!(config.token.timeout, Duration::from_secs(7));
        assert_eq!(config.token.startup_wait, Duration::from_secs(10));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn generic_variables_set_any_key() -> Result<(), ConfigError> {
        let config = load(&[
            ("BEARER_PROXY_TOKEN_TIMEOUT", "200ms"),
            ("BEARER_PROXY_UPSTREAM_URL", "http://127.0.0.1:9/base/"),
        ])?;
        assert_eq!(config.token.timeout, Duration::from_millis(200));
        assert_eq!(config.upstream.url.base_path, "/base");
        Ok(())
    }

    #[test]
    fn tenant_builds_the_token_url_and_token_url_wins() -> Result<(), ConfigError> {
        let config = load(&[("API_TENANT_ID", "contoso.onmicrosoft.com")])?;
        assert_eq!(
            config.token.url.as_str(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        let config = load(&[
            ("API_TENANT_ID", "x"),
            ("API_TOKEN_URL", "http://127.0.0.1:5/token"),
        ])?;
        assert_eq!(config.token.url.as_str(), "http://127.0.0.1:5/token");
        Ok(())
    }

    #[test]
    fn errors_name_the_variable_and_the_expected_form() {
        let e = err(&[("BEARER_PROXY_TOKEN_TIMEOUT", "soon")]);
        assert!(
            e.contains("token.timeout") && e.contains("BEARER_PROXY_TOKEN_TIMEOUT"),
            "{e}"
        );
        assert!(e.contains("duration"), "{e}");
        let e = err(&[("BEARER_PROXY_UPSTREAM", "ftp://x")]);
        assert!(
            e.contains("upstream.url") && e.contains("BEARER_PROXY_UPSTREAM"),
            "{e}"
        );
        let e = err(&[("BEARER_PROXY_LISTEN", "nowhere")]);
        assert!(e.contains("listen") && e.contains("host:port"), "{e}");
        let e = err(&[("BEARER_PROXY_TOKEN_AUTH_METHOD", "private_key_jwt")]);
        assert!(e.contains("client_secret_basic"), "{e}");
        let e = err(&[("BEARER_PROXY_TOKEN_STARTUP_WAIT", "400000000000years")]);
        assert!(
            e.contains("token.startup_wait") && e.contains("at most a year"),
            "{e}"
        );
        let e = err(&[("API_TOKEN_URL", "https://id:secret@login.example.com/token")]);
        assert!(
            e.contains("token.url") && e.contains("user:password") && !e.contains("secret@"),
            "{e}"
        );
        let e = err(&[("BEARER_PROXY_UPSTREAM", "https://user:pa55@api.example.com")]);
        assert!(e.contains("upstream.url") && !e.contains("pa55"), "{e}");
        let e = err(&[("API_CLIENT_SECRET_FILE", "/nonexistent/secret")]);
        assert!(e.contains("API_CLIENT_SECRET") && e.contains("both"), "{e}");
    }

    #[test]
    fn workers_are_auto_or_a_count() -> Result<(), ConfigError> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(load(&[])?.proxy.workers, 1);
        assert_eq!(
            load(&[("BEARER_PROXY_PROXY_WORKERS", "auto")])?
                .proxy
                .workers,
            cpus
        );
        assert_eq!(
            load(&[("BEARER_PROXY_PROXY_WORKERS", "3")])?.proxy.workers,
            3
        );
        for bad in ["0", "257", "many"] {
            let e = err(&[("BEARER_PROXY_PROXY_WORKERS", bad)]);
            assert!(
                e.contains("proxy.workers") && e.contains("BEARER_PROXY_PROXY_WORKERS"),
                "{e}"
            );
            assert!(e.contains("\"auto\""), "{e}");
        }
        Ok(())
    }

    #[test]
    fn missing_credentials_are_named() {
        let e = match Config::load(&Flags::default(), &[("API_CLIENT_SECRET", "x")][..]) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("API_CLIENT_ID"), "{e}");
        let e = match Config::load(&Flags::default(), &[("API_CLIENT_ID", "x")][..]) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("API_CLIENT_SECRET") && e.contains("API_CLIENT_SECRET_FILE"),
            "{e}"
        );
    }

    #[test]
    fn debug_of_the_config_redacts_the_secret() -> Result<(), ConfigError> {
        let config = load(&[])?;
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("ClientSecret([redacted])"), "{shown}");
        Ok(())
    }

    #[test]
    fn sizes_and_retry_bounds() -> Result<(), ConfigError> {
        assert_eq!(
            load(&[("BEARER_PROXY_PROXY_REPLAY_BUFFER", "1MiB")])?
                .proxy
                .replay_buffer,
            1 << 20
        );
        assert_eq!(
            load(&[("BEARER_PROXY_PROXY_REPLAY_BUFFER", "0")])?
                .proxy
                .replay_buffer,
            0
        );
        assert_eq!(
            load(&[("BEARER_PROXY_PROXY_REPLAY_BUFFER", "10KB")])?
                .proxy
                .replay_buffer,
            10_000
        );
        let e = err(&[("BEARER_PROXY_PROXY_REPLAY_BUFFER", "1GiB")]);
        assert!(
            e.contains("proxy.replay_buffer") && e.contains("16MiB"),
            "{e}"
        );
        let e = err(&[("BEARER_PROXY_TOKEN_RETRY_INITIAL", "10m")]);
        assert!(
            e.contains("token.retry_max") && e.contains("token.retry_initial"),
            "{e}"
        );
        let config = load(&[
            ("BEARER_PROXY_TOKEN_REFRESH_BEFORE", "2m"),
            ("BEARER_PROXY_TOKEN_RETRY_INITIAL", "200ms"),
        ])?;
        assert_eq!(config.token.refresh_before, Some(Duration::from_secs(120)));
        assert_eq!(config.token.retry_initial, Duration::from_millis(200));
        Ok(())
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let e = err(&[("API_CLIENT_SECRET", "")]);
        assert!(e.contains("no client secret"), "{e}");
    }

    #[test]
    fn secret_file_is_trimmed_of_one_newline_kind() {
        assert_eq!(trim_secret("abc\n"), "abc");
        assert_eq!(trim_secret("abc\r\n"), "abc");
        assert_eq!(trim_secret(" abc "), " abc ");
    }

    #[test]
    fn every_key_has_a_generic_variable() {
        assert_eq!(
            generic_env_name("upstream.url"),
            "BEARER_PROXY_UPSTREAM_URL"
        );
        assert_eq!(
            generic_env_name("admin_listen"),
            "BEARER_PROXY_ADMIN_LISTEN"
        );
        assert_eq!(generic_env_name("log.format"), "BEARER_PROXY_LOG_FORMAT");
    }

    #[test]
    fn lower_case_proxy_variables_win() {
        let env = [
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:2"),
            ("NO_PROXY", "a.example"),
        ];
        let p = proxies_from_env(&env[..]);
        assert_eq!(p.https.as_ref().map(|u| u.secret()), Some("http://lower:2"));
        assert_eq!(p.no_proxy.as_deref(), Some("a.example"));
        assert!(p.http.is_none());
        assert_eq!(format!("{:?}", p.https), "Some(ProxyUrl([redacted]))");
    }
}
