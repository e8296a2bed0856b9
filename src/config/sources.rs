//! Where values come from: command-line flags, the environment (read
//! through a trait, so tests pass a map) and the TOML file, merged with the
//! documented precedence (flag > variable > file > default) into raw text
//! that `validate` checks.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use super::keys::{
    DEFAULT_CONFIG_FILE, ENV_CLIENT_SECRET, ENV_CONFIG, ENV_IDENTITY_HEADER, KEYS, Kind,
    generic_env_name, known_keys,
};
use super::types::ConfigError;
use crate::egress::Proxies;
use crate::secret::{ClientSecret, ProxyUrl};

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

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Flag(&'static str),
}

#[derive(Debug, Clone)]
pub(super) struct RawValue {
    pub(super) value: String,
    pub(super) source: Source,
}

/// What a key's value came from, for error messages: `token.timeout (set by
/// BEARER_PROXY_TOKEN_TIMEOUT)`.
pub(super) struct Origin<'a>(pub(super) &'a str, pub(super) &'a Source);

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
    pub(super) client_secret: Option<ClientSecret>,
    pub(super) proxies: Proxies,
    /// `AZURE_CLIENT_ID`: the client id for workload and managed identity
    /// when `token.client_id` is not set.
    pub(super) azure_client_id: Option<String>,
    /// `AZURE_TENANT_ID`: the tenant for workload identity when
    /// `token.tenant_id` is not set.
    pub(super) azure_tenant_id: Option<String>,
    /// `IDENTITY_HEADER`: App Service's secret for its identity endpoint.
    pub(super) identity_header: Option<ClientSecret>,
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
        raw.azure_client_id = env_string(env, "AZURE_CLIENT_ID")?;
        raw.azure_tenant_id = env_string(env, "AZURE_TENANT_ID")?;
        raw.identity_header = env_string(env, ENV_IDENTITY_HEADER)?.map(ClientSecret::new);
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
                toml::Value::Integer(number) if spec.kind == Kind::Count => number.to_string(),
                toml::Value::Boolean(flag) if spec.kind == Kind::Bool => flag.to_string(),
                toml::Value::Array(items) if spec.kind == Kind::List => {
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
                    let expected = if spec.kind == Kind::List {
                        "a list of strings"
                    } else if spec.kind == Kind::Bool {
                        "true or false"
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

    pub(super) fn get(&self, key: &str) -> Option<&RawValue> {
        self.values.get(key)
    }

    /// A key's value, or an error if a key with a default somehow has none.
    pub(super) fn require(&self, key: &'static str) -> Result<&RawValue, ConfigError> {
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
/// given: validation normalises them.
pub(super) fn proxies_from_env(env: &(impl Environment + ?Sized)) -> Proxies {
    let read = |names: [&str; 2]| {
        names.iter().find_map(|name| {
            env.var(name)
                .and_then(|v| v.into_string().ok())
                .filter(|v| !v.trim().is_empty())
        })
    };
    Proxies::new(
        read(["http_proxy", "HTTP_PROXY"]).map(ProxyUrl::new),
        read(["https_proxy", "HTTPS_PROXY"]).map(ProxyUrl::new),
        read(["no_proxy", "NO_PROXY"]),
    )
}
