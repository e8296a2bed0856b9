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

/// What `check` found: each finding, the failure if one, and whether all
/// went well; for the terminal ([`text`](Self::text)) or for scripts and
/// support tickets ([`json`](Self::json)). Never the secret or the token.
#[derive(Debug, Default)]
pub struct Report {
    /// What was looked at and found, in order (`token endpoint`, ...).
    pub findings: Vec<(&'static str, String)>,
    /// The step that failed, what went wrong, and what to do.
    pub failure: Option<Failure>,
    /// True when a token was obtained and the status call answered 2xx.
    pub ok: bool,
}

/// Why the check failed.
#[derive(Debug)]
pub struct Failure {
    pub step: String,
    pub what: String,
    pub hint: Option<String>,
}

impl Report {
    /// Lines for the terminal.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (label, value) in &self.findings {
            let _ = writeln!(out, "  {label:<15} {value}");
        }
        if let Some(failure) = &self.failure {
            let _ = writeln!(out, "FAILED: {}", failure.what);
            if let Some(hint) = &failure.hint {
                let _ = writeln!(out, "  {hint}.");
            }
        }
        if self.ok {
            out.push_str("OK: the credentials work and the upstream answers.\n");
        }
        out
    }

    /// One JSON object: `ok`, `findings` (label to value), `failure`.
    pub fn json(&self) -> String {
        // `FAILED` marks the failing step in the text; here `failure`
        // names it, and the step's finding (the URL called) stays.
        let findings: serde_json::Map<String, serde_json::Value> = self
            .findings
            .iter()
            .filter(|(_, value)| value != "FAILED")
            .map(|(label, value)| (label.replace(' ', "_"), value.clone().into()))
            .collect();
        let failure = self
            .failure
            .as_ref()
            .map(|f| serde_json::json!({ "step": f.step, "what": f.what, "hint": f.hint }));
        let report = serde_json::json!({
            "ok": self.ok,
            "findings": findings,
            "failure": failure,
        });
        format!("{report:#}\n")
    }
}

/// Runs the check with the given configuration.
pub async fn run(config: &Config) -> Report {
    let mut report = Report::default();
    report.ok = steps(config, &mut report).await;
    report
}

fn line(out: &mut Report, label: &'static str, value: impl std::fmt::Display) {
    out.findings.push((label, value.to_string()));
}

async fn steps(config: &Config, out: &mut Report) -> bool {
    crate::tls::install_crypto_provider();
    line(out, "token endpoint", &config.token.url);
    line(
        out,
        "client id",
        config
            .token
            .client_id
            .as_deref()
            .unwrap_or("none (the system-assigned identity)"),
    );
    line(
        out,
        "scope",
        config.token.scope.as_deref().unwrap_or("none (not sent)"),
    );
    if !config.token.extra_params.is_empty() {
        // Names only: a value is the user's to show.
        let names: Vec<&str> = config
            .token
            .extra_params
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        line(out, "extra fields", names.join(", "));
    }
    line(
        out,
        "trusted roots",
        crate::tls::roots_description(config.tls.ca_file.as_deref()),
    );
    let route = if config.token.credential.uses_proxies() {
        config.proxies.describe(config.token.url.as_str())
    } else {
        "direct (a managed identity's endpoint is never reached through a proxy)".to_owned()
    };
    line(out, "token route", route);
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
    let credential = endpoint.credential();
    line(
        out,
        "credential",
        format!("{}: {}", credential.kind, credential.detail),
    );
    line(out, "chosen by", credential.reason);

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
            crate::telemetry::rfc3339(expires)
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
        config.upstream.http2,
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

fn token_failure(out: &mut Report, error: &TokenError) -> bool {
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

fn fail(out: &mut Report, step: &'static str, what: &str, hint: Option<&str>) -> bool {
    line(out, step, "FAILED");
    let hint = hint.map(|hint| {
        let mut chars = hint.chars();
        match chars.next() {
            Some(first) => first.to_uppercase().collect::<String>() + chars.as_str(),
            None => String::new(),
        }
    });
    out.failure = Some(Failure {
        step: step.to_owned(),
        what: what.to_owned(),
        hint,
    });
    false
}
