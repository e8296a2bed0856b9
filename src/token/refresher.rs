//! The refresher: the only task that asks the token endpoint for tokens, so
//! at most one request is ever in flight. It fetches at start, renews before
//! expiry, backs off on failure and keeps the last good token meanwhile.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::slot::{CurrentToken, TokenSlot};
use super::{TokenError, TokenSource};

/// The longest `Retry-After` honoured: a provider's absurd value (or an
/// overflowing one) must not park the refresher for years.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

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
    /// Delay before attempt `failures + 1`: exponential with jitter between
    /// `initial` and the doubling cap, `max` for permanent rejections, never
    /// less than the provider's `Retry-After`. `random` is in `[0, 1)`.
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

/// When to renew a token, counted from when its request was sent: at
/// `refresh_in` if the provider sent one, else when the smaller of 5 minutes
/// or a fifth of the lifetime remains (whichever is sooner); never sooner
/// than one second, unless the token is usable for less.
pub fn refresh_after(lifetime: Duration, refresh_in: Option<Duration>) -> Duration {
    let rule = lifetime.saturating_sub((lifetime / 5).min(Duration::from_secs(300)));
    // A `refresh_in` later than the rule would renew after the token has
    // stopped being sent (its expiry margin): the rule is the latest.
    let at = refresh_in.map_or(rule, |refresh_in| refresh_in.min(rule));
    at.max(Duration::from_secs(1).min(rule))
}

/// Owns the token source and the slot.
#[derive(Debug)]
pub struct Refresher<S> {
    source: S,
    slot: TokenSlot,
    retry: RetryPolicy,
}

impl<S: TokenSource> Refresher<S> {
    /// A refresher that writes into `slot`.
    pub fn new(source: S, slot: TokenSlot, retry: RetryPolicy) -> Self {
        Self {
            source,
            slot,
            retry,
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
                let after = refresh_after(f.expires_in, f.refresh_in);
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
                    let next_wall = requested_at_wall + after;
                    self.slot.publish_token(token, next, next_wall);
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
                    let delay = self.retry.delay(failures, &error, fastrand::f64());
                    let now = Instant::now();
                    self.slot
                        .publish_failure(&error, now + delay, SystemTime::now() + delay);
                    let key = format!(
                        "{}:{}",
                        error.code(),
                        error.provider_code().unwrap_or_default()
                    );
                    if last_logged.as_deref() != Some(key.as_str()) {
                        tracing::error!(
                            code = error.code(),
                            provider_code = error.provider_code().unwrap_or_default(),
                            hint = error.hint().unwrap_or_default(),
                            retry_in_ms = delay.as_millis() as u64,
                            "token request failed: {error}"
                        );
                        last_logged = Some(key);
                    } else {
                        tracing::debug!(
                            failures,
                            retry_in_ms = delay.as_millis() as u64,
                            "token request failed again: {error}"
                        );
                    }
                    now + delay
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::secret::AccessToken;
    use crate::token::Fetched;
    use crate::token::error::ProviderError;

    /// Answers from a script; counts calls.
    #[derive(Debug, Clone)]
    struct Scripted {
        calls: Arc<AtomicU32>,
        fail_from: u32,
        fail_until: u32,
        lifetime: Duration,
    }

    impl TokenSource for Scripted {
        async fn fetch(&self) -> Result<Fetched, TokenError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= self.fail_from && n < self.fail_until {
                return Err(TokenError::Status {
                    status: 503,
                    retry_after: None,
                });
            }
            Ok(Fetched {
                token: AccessToken::new(format!("tok-{n}")),
                expires_in: self.lifetime,
                refresh_in: None,
            })
        }
    }

    #[test]
    fn renewal_leaves_the_smaller_of_5_minutes_or_a_fifth() {
        assert_eq!(
            refresh_after(Duration::from_secs(3599), None),
            Duration::from_secs(3299)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(100), None),
            Duration::from_secs(80)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(3599), Some(Duration::from_secs(1800))),
            Duration::from_secs(1800)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(1), None),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn backoff_grows_within_bounds_and_honours_retry_after() {
        let policy = RetryPolicy::default();
        let transient = TokenError::Status {
            status: 503,
            retry_after: None,
        };
        assert_eq!(policy.delay(1, &transient, 0.0), Duration::from_secs(5));
        assert_eq!(policy.delay(1, &transient, 0.99), Duration::from_secs(5));
        assert_eq!(policy.delay(3, &transient, 0.0), Duration::from_secs(5));
        assert_eq!(policy.delay(3, &transient, 1.0), Duration::from_secs(20));
        assert_eq!(policy.delay(20, &transient, 1.0), Duration::from_secs(300));
        let throttled = TokenError::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(40)),
        };
        assert_eq!(policy.delay(1, &throttled, 0.0), Duration::from_secs(40));
        let absurd = TokenError::Status {
            status: 429,
            retry_after: Some(Duration::from_secs(u64::MAX)),
        };
        assert_eq!(policy.delay(1, &absurd, 0.0), MAX_RETRY_AFTER);
        let permanent = TokenError::Rejected(ProviderError {
            status: 401,
            error: "invalid_client".into(),
            codes: vec![7000215],
            description: None,
            retry_after: None,
        });
        assert_eq!(policy.delay(1, &permanent, 0.0), Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn renews_before_expiry_and_keeps_the_token_through_failures() {
        let calls = Arc::new(AtomicU32::new(0));
        let source = Scripted {
            calls: calls.clone(),
            fail_from: 2,
            fail_until: 4,
            lifetime: Duration::from_secs(100),
        };
        let slot = TokenSlot::new();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            Refresher::new(source, slot.clone(), RetryPolicy::default()).run(cancel.clone()),
        );

        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let first = slot.current().map(|t| t.token.secret().to_owned());
        assert_eq!(first.as_deref().ok(), Some("tok-1"));

        // Renewal at 80 s fails (call 2), retried 5 s later (call 3) fails too:
        // the old token is still served.
        tokio::time::sleep(Duration::from_secs(81)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            slot.current()
                .map(|t| t.token.secret().to_owned())
                .ok()
                .as_deref(),
            Some("tok-1")
        );
        assert_eq!(slot.state().consecutive_failures, 1);

        // Call 4 succeeds within the backoff bound (5 s, then at most 10 s).
        tokio::time::sleep(Duration::from_secs(16)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(
            slot.current()
                .map(|t| t.token.secret().to_owned())
                .ok()
                .as_deref(),
            Some("tok-4")
        );
        assert_eq!(slot.state().consecutive_failures, 0);

        cancel.cancel();
        assert!(task.await.is_ok());
    }
}
