//! The validated configuration that the engine runs on, and the error
//! that every check returns.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderValue;
use http::uri::{Authority, Scheme};

use crate::secret::ClientSecret;

/// A configuration error: names the key or variable and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub(super) fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// How the client proves itself at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `client_secret` in the form body.
    ClientSecretPost,
    /// HTTP Basic with the client id and secret.
    ClientSecretBasic,
}

/// How the proxy proves who it is at the token endpoint (`token.credential`).
#[derive(Debug, Clone)]
pub enum Credential {
    /// A client secret (`client_secret`, the default).
    Secret {
        /// Where the secret comes from.
        source: SecretSource,
        /// How it is sent.
        method: AuthMethod,
    },
    /// A certificate and its key: a signed assertion for every token request.
    Certificate {
        /// The PEM files, re-read when they change.
        files: crate::pki::CertFiles,
        /// The assertion's signature.
        algorithm: AssertionAlgorithm,
    },
    /// A federated token from a file, sent as the assertion (Kubernetes
    /// workload identity); the file is read afresh at every token request.
    WorkloadIdentity {
        /// `token.federated_token_file` (`AZURE_FEDERATED_TOKEN_FILE`).
        token_file: PathBuf,
    },
    /// An Azure managed identity: tokens from the local identity endpoint.
    ManagedIdentity {
        /// IMDS, or App Service's endpoint.
        form: ManagedIdentityForm,
        /// The resource the token is for (the scope without `/.default`).
        resource: String,
    },
}

impl Credential {
    /// The kind's name, as `token.credential` takes it.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::Secret { .. } => "client_secret",
            Credential::Certificate { .. } => "certificate",
            Credential::WorkloadIdentity { .. } => "workload_identity",
            Credential::ManagedIdentity { .. } => "managed_identity",
        }
    }

    /// Whether its token requests may go through a forward proxy: not a
    /// managed identity's, whose endpoint is local to the host (IMDS
    /// refuses proxied requests).
    pub fn uses_proxies(&self) -> bool {
        !matches!(self, Credential::ManagedIdentity { .. })
    }
}

/// The signature of a certificate credential's assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssertionAlgorithm {
    /// RSASSA-PSS with SHA-256, header `x5t#S256`: Entra's current form.
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, header `x5t` (SHA-1): older tenants.
    Rs256,
    /// ECDSA P-256 with SHA-256, header `x5t#S256`: for an EC P-256 key.
    Es256,
    /// ECDSA P-384 with SHA-384, header `x5t#S256`: for an EC P-384 key.
    Es384,
}

impl AssertionAlgorithm {
    /// The JWS name.
    pub fn name(self) -> &'static str {
        match self {
            AssertionAlgorithm::Ps256 => "PS256",
            AssertionAlgorithm::Rs256 => "RS256",
            AssertionAlgorithm::Es256 => "ES256",
            AssertionAlgorithm::Es384 => "ES384",
        }
    }
}

/// Where a managed identity's tokens come from.
#[derive(Debug, Clone)]
pub enum ManagedIdentityForm {
    /// A VM's instance metadata service (`Metadata: true`, api-version 2018-02-01).
    Imds,
    /// App Service and Container Apps: `IDENTITY_ENDPOINT` with
    /// `X-IDENTITY-HEADER` from `IDENTITY_HEADER` (api-version 2019-08-01).
    AppService {
        /// `IDENTITY_HEADER`, checked and marked sensitive: a
        /// per-container secret.
        header: HeaderValue,
    },
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
    pub client_cert: Option<crate::pki::CertFiles>,
    /// `upstream.keep_warm`: a connection kept ready from start.
    pub keep_warm: bool,
    /// `upstream.http2`: HTTP/2 offered by ALPN (else HTTP/1.1 only).
    pub http2: bool,
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
    /// OAuth2 client id; `None` only for a system-assigned managed identity.
    pub client_id: Option<String>,
    /// How the proxy proves who it is.
    pub credential: Credential,
    /// Why that credential: which setting or variables chose it.
    pub credential_reason: String,
    /// Requested scope; `None` (`token.scope = "none"`) sends none, as
    /// providers that take an audience or a resource instead want.
    pub scope: Option<String>,
    /// `token.extra_params`: more form fields for the token request
    /// (Auth0's `audience`, the v1 endpoint's `resource`).
    pub extra_params: Vec<(String, String)>,
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
    /// Time a tunnel (WebSocket) may carry nothing either way.
    pub tunnel_idle_timeout: Duration,
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
    /// `log.access`, `log.access_query`.
    pub access_log: AccessLog,
}

/// The access log: one line per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessLog {
    /// `log.access`: on (the default) or off.
    pub on: bool,
    /// `log.access_query`: the query string too (off: it may carry data).
    pub query: bool,
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
