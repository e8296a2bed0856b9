//! Configuration: the table of keys ([`keys`]), where each value comes from
//! (flag > environment > file > default: [`sources`]), and validation
//! ([`validate`]) into the typed [`Config`] ([`types`]).
//!
//! Loading is two steps, as rust-rpxy does it: every source is first read into
//! one map of raw strings that remembers where each value came from, then
//! [`Config::from_raw`] validates each key once, so every error names the key,
//! the variable or flag that set it, and the expected form. The environment is
//! read through the [`Environment`] trait, so tests pass a map and never touch
//! the process environment.

mod credential;
pub mod keys;
mod parse;
pub mod sources;
pub mod types;
pub mod validate;

pub use keys::*;
pub use parse::trim_secret;
pub use sources::{Environment, Flags, ProcessEnv, RawConfig};
pub use types::*;
pub use validate::admin_listen;

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::sources::proxies_from_env;
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
        assert_eq!(config.token.scope.as_deref(), Some(DEFAULT_SCOPE));
        assert_eq!(config.token.client_id.as_deref(), Some("app-id"));
        assert_eq!(config.upstream.response_timeout, Duration::from_secs(60));
        assert_eq!(config.upstream.connect_timeout, Duration::from_secs(10));
        assert!(matches!(
            config.token.credential,
            Credential::Secret {
                source: SecretSource::Literal(_),
                method: AuthMethod::ClientSecretPost
            }
        ));
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
        assert_eq!(config.token.scope.as_deref(), Some("flag-scope"));
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
        assert_eq!(config.token.scope.as_deref(), Some("env-scope"));
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
