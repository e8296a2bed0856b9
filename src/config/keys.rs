//! The key table: every key's name, the flag and variables that set it,
//! its default, what kind of value it takes and what a valid one looks
//! like (for error messages). One entry per key; the sources and the
//! validation read it, and nothing else repeats it.

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
/// Default Entra authority: the public cloud.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
/// The VM's instance metadata service's token endpoint (managed identity).
pub const IMDS_TOKEN_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
/// App Service's per-container secret for its identity endpoint.
pub const ENV_IDENTITY_HEADER: &str = "IDENTITY_HEADER";
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
/// Default time a tunnel (WebSocket) may stay silent both ways: Envoy's
/// stream idle timeout.
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: &str = "5m";
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

/// What a key's value is: the config file's types, and the checks that
/// every key of the kind shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    /// `true` or `false`; a TOML boolean is taken too.
    Bool,
    /// A TOML integer is taken too.
    Count,
    /// A TOML array of strings, or comma-separated text.
    List,
    /// Greater than zero, at most a year.
    Duration,
    /// At most a year.
    DurationOrZero,
    Size,
    File,
    Url,
    Listen,
}

/// One configuration key: its name, the flag and named variables that set it,
/// its default, its kind, and what a valid value looks like.
#[derive(Debug)]
pub struct KeySpec {
    pub key: &'static str,
    pub flag: Option<&'static str>,
    /// Named variables, checked before the generic `BEARER_PROXY_SECTION_KEY`.
    pub env: &'static [&'static str],
    pub default: Option<&'static str>,
    pub kind: Kind,
    /// Said after "expected" when a value is refused.
    pub expected: &'static str,
}

const DURATION: &str =
    "a duration greater than zero and at most a year, such as \"200ms\", \"30s\" or \"5m\"";
const DURATION_OR_ZERO: &str = "a duration of at most a year, such as \"0s\", \"200ms\" or \"30s\"";
const SIZE: &str = "a size of at most 16MiB such as \"64KiB\", \"1MiB\" or \"0\"";

/// Every key, in the order of `config/bearer-proxy.toml`.
pub const KEYS: &[KeySpec] = &[
    KeySpec {
        key: "listen",
        flag: Some("--listen"),
        env: &[],
        default: Some(DEFAULT_LISTEN),
        kind: Kind::Listen,
        expected: "host:port with an IP address or localhost, such as \"127.0.0.1:8080\", or unix: followed by an absolute path, such as \"unix:/run/bearer-proxy/proxy.sock\"",
    },
    KeySpec {
        key: "socket_mode",
        flag: None,
        env: &[],
        default: Some(DEFAULT_SOCKET_MODE),
        kind: Kind::Text,
        expected: "an octal file mode such as \"0600\" or \"0660\"",
    },
    KeySpec {
        key: "admin_listen",
        flag: Some("--admin-listen"),
        env: &[],
        default: Some(DEFAULT_ADMIN_LISTEN),
        kind: Kind::Listen,
        expected: "host:port with an IP address or localhost, such as \"127.0.0.1:9090\"",
    },
    KeySpec {
        key: "upstream.url",
        flag: Some("--upstream"),
        env: &["BEARER_PROXY_UPSTREAM"],
        default: Some(DEFAULT_UPSTREAM),
        kind: Kind::Url,
        expected: "an http:// or https:// URL with a host and no query, such as \"https://api.example.com/base\"",
    },
    KeySpec {
        key: "upstream.user_agent",
        flag: Some("--user-agent"),
        env: &["BEARER_PROXY_USER_AGENT"],
        default: None,
        kind: Kind::Text,
        expected: "printable ASCII text",
    },
    KeySpec {
        key: "upstream.status_path",
        flag: None,
        env: &[],
        default: Some(DEFAULT_STATUS_PATH),
        kind: Kind::Text,
        expected: "a path starting with /, such as \"/api/status\"",
    },
    KeySpec {
        key: "upstream.connect_timeout",
        flag: None,
        env: &[],
        default: Some(DEFAULT_CONNECT_TIMEOUT),
        kind: Kind::Duration,
        expected: DURATION,
    },
    KeySpec {
        key: "upstream.response_timeout",
        flag: None,
        env: &[],
        default: Some(DEFAULT_RESPONSE_TIMEOUT),
        kind: Kind::Duration,
        expected: DURATION,
    },
    KeySpec {
        key: "upstream.keep_warm",
        flag: None,
        env: &[],
        default: Some("true"),
        kind: Kind::Bool,
        expected: "true or false",
    },
    KeySpec {
        key: "upstream.http2",
        flag: None,
        env: &[],
        default: Some("true"),
        kind: Kind::Bool,
        expected: "true or false",
    },
    KeySpec {
        key: "upstream.client_cert_file",
        flag: None,
        env: &[],
        default: None,
        kind: Kind::File,
        expected: "a PEM certificate file, with upstream.client_key_file",
    },
    KeySpec {
        key: "upstream.client_key_file",
        flag: None,
        env: &[],
        default: None,
        kind: Kind::File,
        expected: "a PEM private key file, with upstream.client_cert_file",
    },
    KeySpec {
        key: "tls.ca_file",
        flag: None,
        env: &[],
        default: None,
        kind: Kind::File,
        expected: "a PEM file of CA certificates",
    },
    KeySpec {
        key: "token.url",
        flag: Some("--token-url"),
        env: &["API_TOKEN_URL"],
        default: None,
        kind: Kind::Url,
        expected: "an http:// or https:// URL such as \"https://login.example.com/oauth2/token\"",
    },
    KeySpec {
        key: "token.authority_host",
        flag: None,
        env: &["AZURE_AUTHORITY_HOST"],
        default: Some(DEFAULT_AUTHORITY_HOST),
        kind: Kind::Url,
        expected: "an https:// URL such as \"https://login.microsoftonline.us\" (a national cloud's Entra)",
    },
    KeySpec {
        key: "token.tenant_id",
        flag: Some("--tenant-id"),
        env: &["API_TENANT_ID"],
        default: Some(DEFAULT_TENANT_ID),
        kind: Kind::Text,
        expected: "a tenant id (a GUID) or a domain such as \"contoso.onmicrosoft.com\"",
    },
    KeySpec {
        key: "token.client_id",
        flag: None,
        env: &["API_CLIENT_ID"],
        default: None,
        kind: Kind::Text,
        expected: "the application (client) id",
    },
    KeySpec {
        key: "token.credential",
        flag: None,
        env: &[],
        default: None,
        kind: Kind::Text,
        expected: "client_secret, certificate, workload_identity or managed_identity",
    },
    KeySpec {
        key: "token.client_secret_file",
        flag: None,
        env: &["API_CLIENT_SECRET_FILE"],
        default: None,
        kind: Kind::File,
        expected: "a readable file holding the client secret",
    },
    KeySpec {
        key: "token.certificate_file",
        flag: None,
        env: &[],
        default: None,
        kind: Kind::File,
        expected: "a PEM certificate file, with token.private_key_file",
    },
    KeySpec {
        key: "token.private_key_file",
        flag: None,
        env: &[],
        default: None,
        kind: Kind::File,
        expected: "a PEM private key file (unencrypted), with token.certificate_file",
    },
    KeySpec {
        key: "token.assertion_algorithm",
        flag: None,
        env: &[],
        default: None,
        kind: Kind::Text,
        expected: "PS256 or RS256 for an RSA key (PS256 when unset); an EC key signs with ES256 or ES384",
    },
    KeySpec {
        key: "token.federated_token_file",
        flag: None,
        env: &["AZURE_FEDERATED_TOKEN_FILE"],
        default: None,
        kind: Kind::File,
        expected: "a readable file holding the federated token (Kubernetes projects it)",
    },
    KeySpec {
        key: "token.managed_identity_endpoint",
        flag: None,
        env: &["IDENTITY_ENDPOINT"],
        default: None,
        kind: Kind::Url,
        expected: "an http:// URL of a managed identity endpoint, without a query; unset: the VM's IMDS",
    },
    KeySpec {
        key: "token.scope",
        flag: Some("--scope"),
        env: &["API_SCOPE"],
        default: Some(DEFAULT_SCOPE),
        kind: Kind::Text,
        expected: "a scope such as \"api://app-id/.default\", or none to send no scope",
    },
    KeySpec {
        key: "token.extra_params",
        flag: None,
        env: &[],
        default: None,
        kind: Kind::List,
        expected: "form fields such as \"audience=https://api.example.com\" (name=value; not grant_type, scope, client_id or client_secret)",
    },
    KeySpec {
        key: "token.auth_method",
        flag: None,
        env: &[],
        default: Some(DEFAULT_AUTH_METHOD),
        kind: Kind::Text,
        expected: "client_secret_post or client_secret_basic",
    },
    KeySpec {
        key: "token.timeout",
        flag: None,
        env: &[],
        default: Some(DEFAULT_TOKEN_TIMEOUT),
        kind: Kind::Duration,
        expected: DURATION,
    },
    KeySpec {
        key: "token.startup_wait",
        flag: None,
        env: &[],
        default: Some(DEFAULT_STARTUP_WAIT),
        kind: Kind::DurationOrZero,
        expected: DURATION_OR_ZERO,
    },
    KeySpec {
        key: "token.refresh_before",
        flag: None,
        env: &[],
        default: None,
        kind: Kind::Duration,
        expected: DURATION,
    },
    KeySpec {
        key: "token.retry_initial",
        flag: None,
        env: &[],
        default: Some(DEFAULT_RETRY_INITIAL),
        kind: Kind::Duration,
        expected: DURATION,
    },
    KeySpec {
        key: "token.retry_max",
        flag: None,
        env: &[],
        default: Some(DEFAULT_RETRY_MAX),
        kind: Kind::Duration,
        expected: DURATION,
    },
    KeySpec {
        key: "token.min_forced_interval",
        flag: None,
        env: &[],
        default: Some(DEFAULT_MIN_FORCED_INTERVAL),
        kind: Kind::Duration,
        expected: DURATION,
    },
    KeySpec {
        key: "proxy.replay_buffer",
        flag: None,
        env: &[],
        default: Some(DEFAULT_REPLAY_BUFFER),
        kind: Kind::Size,
        expected: SIZE,
    },
    KeySpec {
        key: "proxy.max_concurrent",
        flag: None,
        env: &[],
        default: Some(DEFAULT_MAX_CONCURRENT),
        kind: Kind::Count,
        expected: "a whole number from 1 to 1000000",
    },
    KeySpec {
        key: "proxy.workers",
        flag: None,
        env: &[],
        default: Some(DEFAULT_WORKERS),
        kind: Kind::Count,
        expected: "\"auto\" (one per CPU) or a whole number from 1 to 256",
    },
    KeySpec {
        key: "proxy.header_timeout",
        flag: None,
        env: &[],
        default: Some(DEFAULT_HEADER_TIMEOUT),
        kind: Kind::Duration,
        expected: DURATION,
    },
    KeySpec {
        key: "proxy.tunnel_idle_timeout",
        flag: None,
        env: &[],
        default: Some(DEFAULT_TUNNEL_IDLE_TIMEOUT),
        kind: Kind::Duration,
        expected: DURATION,
    },
    KeySpec {
        key: "proxy.mask_token_in",
        flag: None,
        env: &[],
        default: Some(DEFAULT_MASK_TOKEN_IN),
        kind: Kind::List,
        expected: "paths starting with /",
    },
    KeySpec {
        key: "guard.allowed_hosts",
        flag: None,
        env: &[],
        default: None,
        kind: Kind::List,
        expected: "host names such as \"bearer-proxy\" or \"api-proxy:8080\", or *",
    },
    KeySpec {
        key: "guard.allowed_origins",
        flag: None,
        env: &[],
        default: None,
        kind: Kind::List,
        expected: "origins such as \"https://app.example.com\", or *",
    },
    KeySpec {
        key: "guard.local_key_file",
        flag: None,
        env: &[],
        default: None,
        kind: Kind::File,
        expected: "a readable file holding the local key",
    },
    KeySpec {
        key: "shutdown.grace",
        flag: None,
        env: &[],
        default: Some(DEFAULT_SHUTDOWN_GRACE),
        kind: Kind::DurationOrZero,
        expected: DURATION_OR_ZERO,
    },
    KeySpec {
        key: "log.format",
        flag: Some("--log-format"),
        env: &[],
        default: Some(DEFAULT_LOG_FORMAT),
        kind: Kind::Text,
        expected: "text or json",
    },
    KeySpec {
        key: "log.access",
        flag: None,
        env: &[],
        default: Some("true"),
        kind: Kind::Bool,
        expected: "true or false",
    },
    KeySpec {
        key: "log.access_query",
        flag: None,
        env: &[],
        default: Some("false"),
        kind: Kind::Bool,
        expected: "true or false",
    },
];

/// Every key the config file may hold, in the order of the table.
pub fn known_keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|spec| spec.key)
}

/// The entry of `key`.
pub fn spec(key: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|spec| spec.key == key)
}

/// The generic variable of a key: `upstream.url` → `BEARER_PROXY_UPSTREAM_URL`.
pub fn generic_env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "_").to_ascii_uppercase())
}
