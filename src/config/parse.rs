//! The checks that every key shares: a value parsed or an error naming
//! the key, where its value came from, the expected form and what was given.

use std::time::Duration;

use super::keys::{Kind, spec};
use super::sources::{Origin, RawConfig, RawValue};
use super::types::ConfigError;

/// What the key table says a valid value of `key` looks like.
pub(super) fn expected(key: &str) -> &'static str {
    spec(key).map_or("a valid value", |spec| spec.expected)
}

/// `key`'s value (which has a default), checked by `parse`.
pub(super) fn parse_bool(raw: &RawConfig, key: &'static str) -> Result<bool, ConfigError> {
    parse_key(raw, key, |s| match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    })
}

pub(super) fn parse_key<T>(
    raw: &RawConfig,
    key: &'static str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, ConfigError> {
    parse_with(raw.require(key)?, key, parse)
}

/// Applies `parse`; on `None`, an error naming the key, its source, the
/// expected form and the value that was given.
pub(super) fn parse_with<T>(
    v: &RawValue,
    key: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, ConfigError> {
    let expected = expected(key);
    parse(v.value.trim()).ok_or_else(|| {
        ConfigError::new(format!(
            "{}: expected {expected}, got {:?}",
            Origin(key, &v.source),
            shorten(&v.value)
        ))
    })
}

pub(super) fn shorten(value: &str) -> String {
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
pub(super) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration; zero only for keys of [`Kind::DurationOrZero`].
pub(super) fn parse_duration(raw: &RawConfig, key: &'static str) -> Result<Duration, ConfigError> {
    let zero_allowed = spec(key).is_some_and(|spec| spec.kind == Kind::DurationOrZero);
    parse_key(raw, key, |s| {
        humantime::parse_duration(s)
            .ok()
            .filter(|d| (zero_allowed || !d.is_zero()) && *d <= MAX_DURATION)
    })
}

/// A comma-separated list; each item trimmed, empty items skipped, each
/// checked by `parse`.
pub(super) fn parse_list(
    raw: &RawConfig,
    key: &'static str,
    parse: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, ConfigError> {
    let expected = expected(key);
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

/// A URL with `user:password` is refused without echoing it: the value holds
/// a credential, and an error message must not print one.
pub(super) fn reject_credentials(v: &RawValue, key: &str) -> Result<(), ConfigError> {
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

/// A secret file's content without its trailing newline.
pub fn trim_secret(content: &str) -> &str {
    content.trim_end_matches(['\n', '\r'])
}
