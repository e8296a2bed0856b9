//! `bearer-proxy check`: one token request and one call of the upstream's
//! status path, reported in words a person can act on. Never prints the
//! secret or the token.

use std::fmt::Write as _;
use std::time::{Instant, SystemTime};

use http::header::{AUTHORIZATION, HOST, USER_AGENT};
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Limited};

use crate::config::Config;
use crate::token::{TokenEndpoint, TokenError, TokenSource};

/// Most of the status answer that is printed.
const BODY_PRINT_LIMIT: usize = 4 * 1024;
/// Most of the status answer that is read.
const BODY_READ_LIMIT: usize = 1024 * 1024;

/// What `check` found: the report to print, and whether all went well.
#[derive(Debug)]
pub struct Report {
    /// Lines for the terminal.
    pub text: String,
    /// True when a token was obtained and the status call answered 2xx.
    pub ok: bool,
}

/// Runs the check with the given configuration.
pub async fn run(config: &Config) -> Report {
    let mut out = String::new();
    let ok = steps(config, &mut out).await;
    let _ = writeln!(
        out,
        "{}",
        if ok {
            "OK: the credentials work and the upstream answers."
        } else {
            ""
        }
    );
    Report {
        text: out.trim_end().to_owned() + "\n",
        ok,
    }
}

fn line(out: &mut String, label: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "  {label:<15} {value}");
}

async fn steps(config: &Config, out: &mut String) -> bool {
    crate::tls::install_crypto_provider();
    line(out, "token endpoint", &config.token.url);
    line(out, "client id", &config.token.client_id);
    line(out, "scope", &config.token.scope);
    line(
        out,
        "trusted roots",
        crate::tls::roots_description(config.tls.ca_file.as_deref()),
    );
    line(
        out,
        "token route",
        config.proxies.describe(config.token.url.as_str()),
    );
    let tls = match crate::tls::client_config(config.tls.ca_file.as_deref()) {
        Ok(tls) => tls,
        Err(e) => return fail(out, "TLS setup", &e, None),
    };
    let endpoint = match TokenEndpoint::new(
        config.token.clone(),
        tls.clone(),
        &config.upstream.user_agent,
        &config.proxies,
    ) {
        Ok(endpoint) => endpoint,
        Err(e) => return fail(out, "token client", &e.to_string(), None),
    };

    let started = Instant::now();
    let fetched = match endpoint.fetch().await {
        Ok(fetched) => fetched,
        Err(error) => return token_failure(out, &error),
    };
    let expires = SystemTime::now() + fetched.expires_in;
    line(
        out,
        "token",
        format!(
            "obtained in {} ms, lifetime {} s (until {})",
            started.elapsed().as_millis(),
            fetched.expires_in.as_secs(),
            humantime::format_rfc3339_seconds(expires)
        ),
    );

    let url = &config.upstream.url;
    let target = format!(
        "{}://{}{}{}",
        url.scheme, url.authority, url.base_path, config.upstream.status_path
    );
    line(out, "status call", format!("GET {target}"));
    line(out, "upstream route", config.proxies.describe(&target));
    if let Some(files) = &config.upstream.client_cert {
        line(out, "client cert", files.cert.display());
    }
    let Ok(uri) = target.parse::<Uri>() else {
        return fail(out, "status call", "the status URL is not valid", None);
    };
    let Ok(mut bearer) = HeaderValue::from_str(&format!("Bearer {}", fetched.token.secret()))
    else {
        return fail(out, "token", "the token cannot be sent in a header", None);
    };
    bearer.set_sensitive(true);
    let request = Request::get(uri)
        .header(AUTHORIZATION, bearer)
        .header(USER_AGENT, config.upstream.user_agent.clone())
        .header(HOST, url.authority.as_str())
        .body(());
    let Ok(request) = request else {
        return fail(out, "status call", "the request cannot be built", None);
    };
    let upstream_tls = match crate::tls::upstream_config(&tls, config.upstream.client_cert.as_ref())
    {
        Ok(tls) => tls,
        Err(e) => return fail(out, "client certificate", &e, None),
    };
    let client = crate::upstream::Upstream::new(
        upstream_tls,
        config.upstream.connect_timeout,
        &config.proxies,
        url.origin(),
    );
    let started = Instant::now();
    let (head, ()) = request.into_parts();
    let response = match tokio::time::timeout(
        config.upstream.response_timeout,
        client.request_bodiless(&head.method, &head.uri, &head.headers, false),
    )
    .await
    {
        Err(_) => {
            let message = format!(
                "no answer within {} (upstream.response_timeout)",
                humantime::format_duration(config.upstream.response_timeout)
            );
            return fail(
                out,
                "status call",
                &message,
                Some("check that the upstream URL is right and reachable"),
            );
        }
        Ok(Err(error)) => {
            let message = crate::upstream::describe_upstream_error(&error, &url.authority);
            return fail(
                out,
                "status call",
                &message.1,
                Some("check upstream.url, DNS, firewalls and tls.ca_file"),
            );
        }
        Ok(Ok(answer)) => answer,
    };
    let status = response.head.status;
    line(
        out,
        "status",
        format!("HTTP {status} in {} ms", started.elapsed().as_millis()),
    );
    line(out, "protocol", format!("{:?}", response.head.version));
    let body = match Limited::new(response.body, BODY_READ_LIMIT).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return fail(out, "status body", &format!("could not be read: {e}"), None),
    };
    let masked = crate::proxy::mask(&body, fetched.token.secret());
    let text = String::from_utf8_lossy(&masked);
    let text = text.trim_end();
    let shown: String = text.chars().take(BODY_PRINT_LIMIT).collect();
    line(
        out,
        "body",
        if shown.len() < text.len() {
            format!("{shown}…")
        } else {
            shown
        },
    );
    if status.is_success() {
        return true;
    }
    let hint = match status.as_u16() {
        401 | 403 => {
            "the upstream refused the token: check that API_SCOPE names the upstream's audience \
             (ending in /.default) and that the application was granted access"
        }
        404 => "the status path was not found: check upstream.url and upstream.status_path",
        500..=599 => "the upstream is failing: try again later, or ask its operators",
        _ => "see the body above",
    };
    fail(
        out,
        "upstream",
        &format!("the status call answered HTTP {status}"),
        Some(hint),
    )
}

fn token_failure(out: &mut String, error: &TokenError) -> bool {
    let what = match error {
        TokenError::Rejected(p) => {
            let code = p
                .codes
                .first()
                .map(|c| format!(", AADSTS{c}"))
                .unwrap_or_default();
            format!(
                "the token endpoint rejected the request (HTTP {} {}{code})",
                p.status, p.error
            )
        }
        other => other.to_string(),
    };
    let description = match error {
        TokenError::Rejected(p) if error.hint().is_none() => p.description.clone(),
        _ => None,
    };
    let hint = error.hint().map(str::to_owned).or(description);
    fail(out, "token", &what, hint.as_deref())
}

fn fail(out: &mut String, step: &str, what: &str, hint: Option<&str>) -> bool {
    line(out, step, "FAILED");
    let _ = writeln!(out, "FAILED: {what}");
    if let Some(hint) = hint {
        let mut chars = hint.chars();
        let sentence = match chars.next() {
            Some(first) => first.to_uppercase().collect::<String>() + chars.as_str(),
            None => String::new(),
        };
        let _ = writeln!(out, "  {sentence}.");
    }
    false
}
