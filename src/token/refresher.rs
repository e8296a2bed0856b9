//! The refresher: the only task that asks the token endpoint for tokens, so
//! at most one request is ever in flight. It fetches at start, renews before
//! expiry (or at once when an upstream 401 forces it), backs off on failure
//! and keeps the last good token meanwhile.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::slot::{CurrentToken, TokenSlot, expiry_margin};
use super::{TokenError, TokenSource};

/// The longest `Retry-After` honoured: a provider's absurd value (or an
/// overflowing one) must not park the refresher for years.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Tokens living longer than this are renewed at half-life (as MSAL does for
/// managed-identity tokens).
pub const LONG_LIVED: Duration = Duration::from_secs(2 * 3600);
/// The renewal moves earlier by up to this share of its lead, so a fleet of
/// sidecars started together does not renew in the same second.
pub const JITTER_SHARE: f64 = 0.1;

/// Backoff between failed attempts.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Largest delay; permanent rejections wait this long.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(5),
            max: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `failures + 1`: exponential backoff with full
    /// jitter over the doubling window `min(max, initial · 2^(failures-1))`,
    /// but never below `initial` (a retry comes seconds later, not
    /// milliseconds); `max` for permanent rejections; never less than the
    /// provider's `Retry-After`. `random` is in `[0, 1)`.
    pub fn delay(&self, failures: u32, error: &TokenError, random: f64) -> Duration {
        let base = if error.is_permanent() {
            self.max
        } else {
            let exp = failures.saturating_sub(1).min(30);
            let cap = self.initial.saturating_mul(1u32 << exp).min(self.max);
            let floor = self.initial.min(cap);
            floor + (cap - floor).mul_f64(random.clamp(0.0, 1.0))
        };
        match error.retry_after() {
            Some(floor) => base.max(floor.min(MAX_RETRY_AFTER)),
            None => base,
        }
    }
}

/// When to renew a token, counted from when its request was sent:
/// - `lifetime - refresh_before` when `token.refresh_before` is set;
/// - else at `refresh_in` where the provider sends it;
/// - else at half-life for tokens longer than 2 hours;
/// - else when the smaller of 5 minutes or a fifth of the lifetime remains;
///
/// then earlier by a jitter of up to 10% of the lead (`random` in `[0, 1)`).
/// The lead is at least twice the expiry margin, so a token is renewed well
/// before it stops being sent; the renewal is never sooner than one second
/// unless the token is usable for less.
pub fn refresh_after(
    lifetime: Duration,
    refresh_in: Option<Duration>,
    refresh_before: Option<Duration>,
    random: f64,
) -> Duration {
    let at = match (refresh_before, refresh_in) {
        // A lead as long as the token would renew it at once, and again a
        // second later, for ever: at most half the lifetime.
        (Some(before), _) => lifetime.saturating_sub(before.min(lifetime / 2)),
        (None, Some(refresh_in)) => refresh_in,
        (None, None) if lifetime > LONG_LIVED => lifetime / 2,
        (None, None) => lifetime.saturating_sub((lifetime / 5).min(Duration::from_secs(300))),
    };
    let latest = lifetime.saturating_sub(expiry_margin(lifetime) * 2);
    let at = at.min(latest);
    let lead = lifetime - at;
    let at = at.saturating_sub(lead.mul_f64(JITTER_SHARE * random.clamp(0.0, 1.0)));
    at.max(Duration::from_secs(1).min(latest))
}

/// How the refresher schedules its requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefreshPolicy {
    /// Backoff after failures.
    pub retry: RetryPolicy,
    /// `token.refresh_before`, overriding the built-in lead.
    pub refresh_before: Option<Duration>,
}

/// Owns the token source and the slot.
#[derive(Debug)]
pub struct Refresher<S> {
    source: S,
    slot: TokenSlot,
    policy: RefreshPolicy,
}

impl<S: TokenSource> Refresher<S> {
    /// A refresher that writes into `slot`.
    pub fn new(source: S, slot: TokenSlot, policy: RefreshPolicy) -> Self {
        Self {
            source,
            slot,
            policy,
        }
    }

    /// Runs until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let mut failures: u32 = 0;
        let mut last_logged: Option<String> = None;
        loop {
            let requested_at = Instant::now();
            let requested_at_wall = SystemTime::now();
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                result = self.source.fetch() => result,
            };
            let fetched = result.and_then(|f| {
                let after = refresh_after(
                    f.expires_in,
                    f.refresh_in,
                    self.policy.refresh_before,
                    fastrand::f64(),
                );
                CurrentToken::new(f.token, f.expires_in, requested_at, requested_at_wall)
                    .map(|token| (token, after, f.expires_in))
                    .ok_or_else(|| {
                        TokenError::InvalidResponse(
                            "access_token is not valid in an HTTP header".into(),
                        )
                    })
            });
            let wake = match fetched {
                Ok((token, after, lifetime)) => {
                    let next = requested_at + after;
                    self.slot
                        .publish_token(token, next, requested_at_wall + after);
                    if failures > 0 {
                        tracing::info!(failures, "token endpoint recovered: new token obtained");
                    } else {
                        tracing::info!(
                            lifetime_s = lifetime.as_secs(),
                            renew_in_s = after.as_secs(),
                            "token obtained"
                        );
                    }
                    failures = 0;
                    last_logged = None;
                    next
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let delay = self.policy.retry.delay(failures, &error, fastrand::f64());
                    let now = Instant::now();
                    self.slot
                        .publish_failure(&error, now + delay, SystemTime::now() + delay);
                    log_failure(&error, failures, delay, &mut last_logged);
                    now + delay
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => {}
                // Forced renewals are only granted while no backoff runs
                // (see `TokenSlot::request_renewal`), so this never cuts one short.
                _ = self.slot.forced() => tracing::info!("renewing the token now: the upstream refused it"),
            }
        }
    }
}

/// One ERROR line when the failure changes (first failure, different
/// error); repeats of the same failure go to DEBUG.
fn log_failure(
    error: &TokenError,
    failures: u32,
    delay: Duration,
    last_logged: &mut Option<String>,
) {
    let key = format!(
        "{}:{}",
        error.code(),
        error.provider_code().unwrap_or_default()
    );
    let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    if last_logged.as_deref() == Some(key.as_str()) {
        tracing::debug!(failures, retry_in_ms, "token request failed again: {error}");
        return;
    }
    tracing::error!(
        code = error.code(),
        provider_code = error.provider_code().unwrap_or_default(),
        hint = error.hint().unwrap_or_default(),
        failures,
        retry_in_ms,
        "token request failed: {error}"
    );
    *last_logged = Some(key);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::secret::AccessToken;
    use crate::token::Fetched;
    use crate::token::error::ProviderError;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// A fake token source: answers from a script of outcomes (then
    /// successes), records the instant of every call.
    #[derive(Debug, Clone)]
    struct Scripted {
        calls: Arc<Mutex<Vec<Instant>>>,
        script: Arc<Mutex<Vec<Result<Duration, TokenError>>>>,
        issued: Arc<AtomicU32>,
    }

    impl Scripted {
        fn new(script: Vec<Result<Duration, TokenError>>) -> Self {
            let mut script = script;
            script.reverse();
            Self {
                calls: Arc::default(),
                script: Arc::new(Mutex::new(script)),
                issued: Arc::default(),
            }
        }

        fn calls(&self) -> Vec<Instant> {
            self.calls.lock().map(|c| c.clone()).unwrap_or_default()
        }
    }

    impl TokenSource for Scripted {
        async fn fetch(&self) -> Result<Fetched, TokenError> {
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(Instant::now());
            }
            let next = self
                .script
                .lock()
                .ok()
                .and_then(|mut s| s.pop())
                .unwrap_or(Ok(S(100)));
            let lifetime = next?;
            let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Fetched {
                token: AccessToken::new(format!("tok-{n}")),
                expires_in: lifetime,
                refresh_in: None,
            })
        }
    }

    fn unavailable() -> TokenError {
        TokenError::Status {
            status: 503,
            retry_after: None,
        }
    }

    fn start(source: &Scripted, policy: RefreshPolicy) -> (TokenSlot, CancellationToken) {
        let slot = TokenSlot::new();
        let cancel = CancellationToken::new();
        tokio::spawn(Refresher::new(source.clone(), slot.clone(), policy).run(cancel.clone()));
        (slot, cancel)
    }

    fn current(slot: &TokenSlot) -> Option<String> {
        slot.current().ok().map(|t| t.token.secret().to_owned())
    }

    #[test]
    fn schedule_by_lifetime_and_provider_hints() {
        // Short and ordinary lifetimes: min(5 min, a fifth) before expiry.
        assert_eq!(refresh_after(S(3599), None, None, 0.0), S(3299));
        assert_eq!(refresh_after(S(100), None, None, 0.0), S(80));
        assert_eq!(refresh_after(S(10), None, None, 0.0), S(8));
        // Long-lived: half-life.
        assert_eq!(refresh_after(S(24 * 3600), None, None, 0.0), S(12 * 3600));
        assert_eq!(
            refresh_after(S(2 * 3600), None, None, 0.0),
            S(2 * 3600 - 300)
        );
        // refresh_in where sent, but never later than twice the expiry margin before expiry.
        assert_eq!(refresh_after(S(3599), Some(S(1800)), None, 0.0), S(1800));
        assert_eq!(refresh_after(S(3599), Some(S(3590)), None, 0.0), S(3539));
        // token.refresh_before overrides the lead, within the same bound.
        assert_eq!(refresh_after(S(3599), None, Some(S(120)), 0.0), S(3479));
        assert_eq!(
            refresh_after(S(3599), Some(S(1800)), Some(S(120)), 0.0),
            S(3479)
        );
        assert_eq!(refresh_after(S(3599), None, Some(S(1)), 0.0), S(3539));
        assert_eq!(
            refresh_after(S(300), None, Some(S(300)), 0.0),
            S(150),
            "a lead past the lifetime is halved"
        );
        // Tiny lifetimes stay inside the usable window.
        assert_eq!(
            refresh_after(S(1), None, None, 0.0),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn jitter_moves_the_renewal_earlier_by_at_most_a_tenth_of_the_lead() {
        for (lifetime, refresh_in, before) in [
            (S(3599), None, None),
            (S(100), None, None),
            (S(86400), None, None),
            (S(3599), Some(S(1800)), None),
            (S(3599), None, Some(S(600))),
        ] {
            let plain = refresh_after(lifetime, refresh_in, before, 0.0);
            let lead = lifetime - plain;
            let earliest = refresh_after(lifetime, refresh_in, before, 0.999_999);
            assert!(earliest <= plain, "{lifetime:?}");
            assert!(
                plain - earliest <= lead / 10 + Duration::from_millis(1),
                "{lifetime:?}: {earliest:?} vs {plain:?}"
            );
            assert!(
                plain - earliest >= (lead / 10).mul_f64(0.999),
                "the whole range is used"
            );
            let mid = refresh_after(lifetime, refresh_in, before, 0.5);
            assert!(earliest < mid && mid < plain);
        }
    }

    #[test]
    fn backoff_grows_within_bounds_and_honours_retry_after() {
        let policy = RetryPolicy::default();
        let transient = unavailable();
        assert_eq!(policy.delay(1, &transient, 0.0), S(5));
        assert_eq!(policy.delay(1, &transient, 0.99), S(5));
        assert_eq!(policy.delay(3, &transient, 0.0), S(5));
        assert_eq!(policy.delay(3, &transient, 1.0), S(20));
        assert_eq!(policy.delay(20, &transient, 1.0), S(300));
        let throttled = TokenError::Status {
            status: 429,
            retry_after: Some(S(40)),
        };
        assert_eq!(policy.delay(1, &throttled, 0.0), S(40));
        let absurd = TokenError::Status {
            status: 429,
            retry_after: Some(S(u64::MAX)),
        };
        assert_eq!(policy.delay(1, &absurd, 0.0), MAX_RETRY_AFTER);
        let permanent = TokenError::Rejected(ProviderError {
            status: 401,
            error: "invalid_client".into(),
            codes: vec![7000215],
            description: None,
            retry_after: None,
        });
        assert_eq!(policy.delay(1, &permanent, 0.0), S(300));
    }

    #[tokio::test(start_paused = true)]
    async fn renews_before_expiry() {
        let source = Scripted::new(vec![]);
        let (slot, cancel) = start(&source, RefreshPolicy::default());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(current(&slot).as_deref(), Some("tok-1"));
        // 100 s tokens: renewed at 80 s at the latest, 78 s at the earliest (jitter).
        tokio::time::sleep(S(77)).await;
        assert_eq!(source.calls().len(), 1);
        tokio::time::sleep(S(3)).await;
        assert_eq!(source.calls().len(), 2);
        assert_eq!(current(&slot).as_deref(), Some("tok-2"));
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn five_failures_keep_the_old_token_and_back_off_within_bounds() {
        let mut script = vec![Ok(S(1000))];
        script.extend((0..5).map(|_| Err(unavailable())));
        let source = Scripted::new(script);
        let (slot, cancel) = start(&source, RefreshPolicy::default());
        // Token of 1000 s: renewal at 800 s minus up to 20 s of jitter; it
        // stays usable until 970 s. Five failures then take 5 + [5,10] +
        // [5,20] + [5,40] + [5,80] s: the old token is held throughout.
        tokio::time::sleep(S(800)).await;
        let mut seen = Vec::new();
        for _ in 0..200 {
            tokio::time::sleep(S(1)).await;
            if source.calls().len() <= 6 {
                seen.push(current(&slot));
            }
        }
        let calls = source.calls();
        assert!(
            calls.len() >= 7,
            "five failures then a success: {}",
            calls.len()
        );
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
        let bounds = [
            (S(5), S(5)),
            (S(5), S(10)),
            (S(5), S(20)),
            (S(5), S(40)),
            (S(5), S(80)),
        ];
        for (gap, (low, high)) in gaps[1..6].iter().zip(bounds) {
            assert!(
                *gap >= low && *gap <= high,
                "gap {gap:?} outside [{low:?}, {high:?}]"
            );
        }
        assert!(
            seen.iter().all(|t| t.as_deref() == Some("tok-1")),
            "the old token is kept: {seen:?}"
        );
        assert_ne!(
            current(&slot).as_deref(),
            Some("tok-1"),
            "recovered with a new token"
        );
        assert_eq!(slot.state().consecutive_failures, 0);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_a_floor() {
        let throttled = TokenError::Status {
            status: 429,
            retry_after: Some(S(30)),
        };
        let source = Scripted::new(vec![Err(throttled)]);
        let (slot, cancel) = start(&source, RefreshPolicy::default());
        tokio::time::sleep(S(29)).await;
        assert_eq!(
            source.calls().len(),
            1,
            "no request before Retry-After has passed"
        );
        assert!(slot.current().is_err());
        tokio::time::sleep(S(2)).await;
        assert_eq!(source.calls().len(), 2);
        let calls = source.calls();
        assert!(calls[1] - calls[0] >= S(30));
        assert!(slot.current().is_ok());
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_empties_the_slot_and_the_next_token_recovers() {
        // A 100 s token, then the provider fails for a long while.
        let mut script = vec![Ok(S(100))];
        script.extend((0..6).map(|_| Err(unavailable())));
        let source = Scripted::new(script);
        let policy = RefreshPolicy {
            retry: RetryPolicy {
                initial: S(5),
                max: S(10),
            },
            refresh_before: None,
        };
        let (slot, cancel) = start(&source, policy);
        tokio::time::sleep(S(89)).await;
        assert_eq!(
            current(&slot).as_deref(),
            Some("tok-1"),
            "usable until 90 s (expiry minus 10 s)"
        );
        tokio::time::sleep(S(2)).await;
        let unavailable = slot.current().err();
        assert!(
            unavailable
                .as_ref()
                .is_some_and(|u| u.reason.contains("expired") && u.retry_after_secs >= 1),
            "{unavailable:?}"
        );
        assert!(slot.readiness().is_err());
        // Six failures at most 10 s apart from ~80 s: recovered by ~150 s.
        tokio::time::sleep(S(70)).await;
        assert_eq!(current(&slot).as_deref(), Some("tok-2"));
        assert!(slot.readiness().is_ok());
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn forced_renewal_is_single_flight_and_rate_limited() {
        let source = Scripted::new(vec![]);
        let (slot, cancel) = start(&source, RefreshPolicy::default());
        tokio::time::sleep(Duration::from_millis(1)).await;
        let first = slot.current().map(|t| t.generation).unwrap_or_default();

        // Many requests see a 401 at once: one renewal.
        let outcomes: Vec<_> = (0..100)
            .map(|_| slot.request_renewal(first, S(30)))
            .collect();
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, crate::token::slot::Renewal::Pending))
        );
        let renewed = slot.wait_renewal(first, S(5)).await;
        assert_eq!(
            renewed.map(|t| t.token.secret().to_owned()).as_deref(),
            Some("tok-2")
        );
        assert_eq!(source.calls().len(), 2);
        // A request still holding the old generation gets the newer token at once.
        assert!(matches!(
            slot.request_renewal(first, S(30)),
            crate::token::slot::Renewal::Newer(_)
        ));
        // A second forced renewal inside min_forced_interval is declined.
        let second = slot.current().map(|t| t.generation).unwrap_or_default();
        tokio::time::sleep(S(10)).await;
        assert!(matches!(
            slot.request_renewal(second, S(30)),
            crate::token::slot::Renewal::Declined
        ));
        tokio::time::sleep(S(21)).await;
        assert!(matches!(
            slot.request_renewal(second, S(30)),
            crate::token::slot::Renewal::Pending
        ));
        assert!(slot.wait_renewal(second, S(5)).await.is_some());
        assert_eq!(source.calls().len(), 3);
        assert_eq!(slot.state().forced_renewals, 2);
        cancel.cancel();
    }
}
