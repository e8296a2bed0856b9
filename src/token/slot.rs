//! The token slot: the one place the current token lives. The refresher
//! writes it; the request path reads it without ever waiting on the token
//! endpoint while a valid token is held.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::TokenError;
use crate::secret::AccessToken;

/// A token ready for use on the request path.
#[derive(Debug)]
pub struct CurrentToken {
    /// The token itself (needed to mask it where an upstream echoes it).
    pub token: AccessToken,
    /// `Bearer <token>`, marked sensitive, built once per token.
    pub header: HeaderValue,
    /// Last instant at which it may be sent: its expiry minus a safety margin.
    pub usable_until: Instant,
    /// Wall-clock expiry, for `/status`.
    pub expires_at: SystemTime,
    /// Wall-clock time the request for it was sent.
    pub obtained_at: SystemTime,
    /// 1 for the first token, one more for each after it.
    pub generation: u64,
}

impl CurrentToken {
    /// Builds the header; `requested_at` is when the request was *sent*, since
    /// the lifetime counts from then.
    pub fn new(
        token: AccessToken,
        lifetime: Duration,
        requested_at: Instant,
        requested_at_wall: SystemTime,
    ) -> Option<Self> {
        let mut header = HeaderValue::from_str(&format!("Bearer {}", token.secret())).ok()?;
        header.set_sensitive(true);
        Some(Self {
            token,
            header,
            usable_until: requested_at + lifetime.saturating_sub(expiry_margin(lifetime)),
            expires_at: requested_at_wall + lifetime,
            obtained_at: requested_at_wall,
            generation: 0,
        })
    }

    /// Whether it may still be sent at `now`.
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    /// A copy that shares no memory with this one: the header's bytes are
    /// its own, so that its reference counts stay on one core.
    fn copy(&self) -> Self {
        let mut header =
            HeaderValue::from_bytes(self.header.as_bytes()).unwrap_or_else(|_| self.header.clone());
        header.set_sensitive(true);
        Self {
            token: self.token.clone(),
            header,
            usable_until: self.usable_until,
            expires_at: self.expires_at,
            obtained_at: self.obtained_at,
            generation: self.generation,
        }
    }
}

/// One worker's copy of the slot's current token, copied again when the
/// slot changes. The request path then reads no memory that another core
/// writes: no lock shared between workers (the slot's), no reference
/// count shared with them (the token's, its header's).
#[derive(Debug)]
pub struct LocalToken {
    slot: TokenSlot,
    copy: std::sync::Mutex<(watch::Receiver<TokenState>, Option<Arc<CurrentToken>>)>,
}

impl LocalToken {
    fn new(slot: &TokenSlot) -> Self {
        let mut seen = slot.tx.subscribe();
        // Copied on first use.
        seen.mark_changed();
        Self {
            slot: slot.clone(),
            copy: std::sync::Mutex::new((seen, None)),
        }
    }

    /// As [`TokenSlot::current`].
    pub fn current(&self) -> Result<Arc<CurrentToken>, Unavailable> {
        if let Ok(mut copy) = self.copy.lock() {
            let (seen, token) = &mut *copy;
            if seen.has_changed().unwrap_or(false) {
                // Copied again only for another token, not for every other
                // change of the state (a failure, a renewal asked for).
                let state = seen.borrow_and_update();
                let generation = |t: &CurrentToken| t.generation;
                if state.current.as_deref().map(generation) != token.as_deref().map(generation) {
                    *token = state
                        .current
                        .as_deref()
                        .map(|current| Arc::new(current.copy()));
                }
            }
            if let Some(token) = token.as_ref().filter(|t| t.is_usable(Instant::now())) {
                return Ok(Arc::clone(token));
            }
        }
        self.slot.current()
    }
}

impl Clone for LocalToken {
    /// A copy of its own.
    fn clone(&self) -> Self {
        Self::new(&self.slot)
    }
}

/// A token counts as expired this long before its real expiry, so that one
/// sent just before never arrives expired: `min(30 s, lifetime / 10)`.
pub fn expiry_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(30))
}

/// The last failure, as `/status` shows it.
#[derive(Debug, Clone)]
pub struct LastError {
    /// Short code (`invalid_client`, `connect_failed`, ...).
    pub code: String,
    /// Provider code such as `AADSTS7000215`.
    pub provider_code: Option<String>,
    /// One sentence.
    pub message: String,
    /// When it happened.
    pub at: SystemTime,
}

/// Everything known about the token.
#[derive(Debug, Clone, Default)]
pub struct TokenState {
    /// The latest token obtained, usable or not.
    pub current: Option<Arc<CurrentToken>>,
    /// When the refresher asks next.
    pub next_attempt: Option<Instant>,
    /// The same, on the wall clock.
    pub next_attempt_wall: Option<SystemTime>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// The most recent failure, kept after a recovery.
    pub last_error: Option<LastError>,
    /// A renewal forced by an upstream 401 is asked for and not done yet.
    pub forced_pending: bool,
    /// When the last forced renewal was asked for.
    pub last_forced: Option<Instant>,
    /// Forced renewals asked for since start.
    pub forced_renewals: u64,
    /// Token requests since start by outcome, OAuth2 error and provider
    /// code (`("rejected", "invalid_client", "AADSTS7000215")`); a
    /// bounded set: past [`MAX_OUTCOMES`] kinds, new ones count as
    /// `("other", "", "")`.
    pub outcomes: BTreeMap<(&'static str, String, String), u64>,
}

/// The most kinds of token outcome kept apart.
pub const MAX_OUTCOMES: usize = 32;

/// A provider's error code as it may go into a label or a log line: the
/// characters an OAuth2 error code uses, at most 64 (a provider could send
/// anything, of any length).
fn label_safe(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .take(64)
        .collect()
}

fn count_outcome(
    outcomes: &mut BTreeMap<(&'static str, String, String), u64>,
    key: (&'static str, String, String),
) {
    let key = if outcomes.len() >= MAX_OUTCOMES && !outcomes.contains_key(&key) {
        ("other", String::new(), String::new())
    } else {
        key
    };
    *outcomes.entry(key).or_default() += 1;
}

/// What became of a request to renew a token that the upstream refused.
#[derive(Debug)]
pub enum Renewal {
    /// A newer token is already held: use it.
    Newer(Arc<CurrentToken>),
    /// A renewal is under way: wait for it.
    Pending,
    /// None will be made now (one was forced too recently, or the refresher
    /// is already retrying after failures at the pace the provider allows).
    Declined,
}

/// Why no token can be used now.
#[derive(Debug, Clone)]
pub struct Unavailable {
    /// Seconds until the next attempt, at least 1.
    pub retry_after_secs: u64,
    /// Why, in one sentence.
    pub reason: String,
}

/// Shared handle on the token state: cheap to clone.
#[derive(Debug, Clone)]
pub struct TokenSlot {
    tx: Arc<watch::Sender<TokenState>>,
    /// Wakes the refresher when a renewal is forced.
    renew: Arc<Notify>,
}

impl Default for TokenSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(TokenState::default())),
            renew: Arc::new(Notify::new()),
        }
    }

    /// A view of the current token for one worker's request path.
    pub fn local(&self) -> LocalToken {
        LocalToken::new(self)
    }

    /// A copy of the whole state (for `/status`).
    pub fn state(&self) -> TokenState {
        self.tx.borrow().clone()
    }

    /// Stores a new token and the time of the next renewal.
    pub fn publish_token(&self, mut token: CurrentToken, next: Instant, next_wall: SystemTime) {
        self.tx.send_modify(|state| {
            token.generation = state.current.as_ref().map_or(0, |t| t.generation) + 1;
            state.current = Some(Arc::new(token));
            state.forced_pending = false;
            state.next_attempt = Some(next);
            state.next_attempt_wall = Some(next_wall);
            state.consecutive_failures = 0;
            count_outcome(
                &mut state.outcomes,
                ("obtained", String::new(), String::new()),
            );
        });
    }

    /// Records a failure and the time of the next attempt; a held token stays.
    pub fn publish_failure(&self, error: &TokenError, next: Instant, next_wall: SystemTime) {
        let message = match error.hint() {
            Some(hint) => format!("{error} ({hint})"),
            None => error.to_string(),
        };
        self.tx.send_modify(|state| {
            state.forced_pending = false;
            state.next_attempt = Some(next);
            state.next_attempt_wall = Some(next_wall);
            state.consecutive_failures = state.consecutive_failures.saturating_add(1);
            let error_code = match error {
                TokenError::Rejected(_) => label_safe(error.code()),
                _ => String::new(),
            };
            count_outcome(
                &mut state.outcomes,
                (
                    error.outcome(),
                    error_code,
                    error.provider_code().unwrap_or_default(),
                ),
            );
            state.last_error = Some(LastError {
                code: label_safe(error.code()),
                provider_code: error.provider_code(),
                message,
                at: SystemTime::now(),
            });
        });
    }

    /// The token to send now, or why there is none.
    pub fn current(&self) -> Result<Arc<CurrentToken>, Unavailable> {
        let state = self.tx.borrow();
        let now = Instant::now();
        match &state.current {
            Some(token) if token.is_usable(now) => Ok(Arc::clone(token)),
            _ => Err(unavailable(&state, now)),
        }
    }

    /// Like [`current`](Self::current), but before the first token has ever
    /// arrived waits up to `wait` for it.
    pub async fn current_or_wait(&self, wait: Duration) -> Result<Arc<CurrentToken>, Unavailable> {
        let deadline = Instant::now() + wait;
        let mut rx = self.tx.subscribe();
        loop {
            {
                let state = rx.borrow_and_update();
                let now = Instant::now();
                match &state.current {
                    Some(token) if token.is_usable(now) => return Ok(Arc::clone(token)),
                    Some(_) => return Err(unavailable(&state, now)),
                    None if now >= deadline => return Err(unavailable(&state, now)),
                    // A failed attempt scheduled the next one past the
                    // deadline: no token can come in time, so say so now.
                    None if state.last_error.is_some()
                        && state.next_attempt.is_some_and(|next| next > deadline) =>
                    {
                        return Err(unavailable(&state, now));
                    }
                    None => {}
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                let state = rx.borrow();
                return Err(unavailable(&state, Instant::now()));
            }
        }
    }

    /// Asks for a new token because the upstream refused the one of
    /// `failed_generation`. Many requests may ask at once: one renewal is
    /// made, at most one per `min_interval`, never during a backoff.
    pub fn request_renewal(&self, failed_generation: u64, min_interval: Duration) -> Renewal {
        let mut outcome = Renewal::Declined;
        let asked = self.tx.send_if_modified(|state| {
            let now = Instant::now();
            if let Some(token) = &state.current
                && token.generation > failed_generation
                && token.is_usable(now)
            {
                outcome = Renewal::Newer(Arc::clone(token));
                return false;
            }
            if state.forced_pending {
                outcome = Renewal::Pending;
                return false;
            }
            let too_soon = state.last_forced.is_some_and(|at| now < at + min_interval);
            if too_soon || state.consecutive_failures > 0 {
                return false;
            }
            state.forced_pending = true;
            state.last_forced = Some(now);
            state.forced_renewals += 1;
            outcome = Renewal::Pending;
            true
        });
        if asked {
            self.renew.notify_one();
        }
        outcome
    }

    /// Waits up to `wait` for the forced renewal to end; the new token if it
    /// brought one.
    pub async fn wait_renewal(
        &self,
        failed_generation: u64,
        wait: Duration,
    ) -> Option<Arc<CurrentToken>> {
        let deadline = Instant::now() + wait;
        let mut rx = self.tx.subscribe();
        loop {
            {
                let state = rx.borrow_and_update();
                if let Some(token) = &state.current
                    && token.generation > failed_generation
                    && token.is_usable(Instant::now())
                {
                    return Some(Arc::clone(token));
                }
                if !state.forced_pending {
                    return None;
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Resolves when a renewal has been forced (the refresher's wake-up).
    pub async fn forced(&self) {
        loop {
            if self.tx.borrow().forced_pending {
                return;
            }
            self.renew.notified().await;
        }
    }

    /// `Ok` while a usable token is held; else the reason.
    pub fn readiness(&self) -> Result<(), String> {
        self.current().map(|_| ()).map_err(|u| u.reason)
    }
}

fn unavailable(state: &TokenState, now: Instant) -> Unavailable {
    let retry_after_secs = state
        .next_attempt
        .map(|at| at.saturating_duration_since(now).as_secs_f64().ceil() as u64)
        .unwrap_or(1)
        .max(1);
    let reason = match (&state.current, &state.last_error) {
        (Some(_), Some(error)) => format!(
            "the token expired and renewing it failed: {}",
            error.message
        ),
        (Some(_), None) => "the token expired and has not been renewed yet".to_owned(),
        (None, Some(error)) => format!("no token yet: {}", error.message),
        (None, None) => "no token yet: the first token request has not completed".to_owned(),
    };
    Unavailable {
        retry_after_secs,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_is_a_tenth_capped_at_30s() {
        assert_eq!(
            expiry_margin(Duration::from_secs(3599)),
            Duration::from_secs(30)
        );
        assert_eq!(
            expiry_margin(Duration::from_secs(100)),
            Duration::from_secs(10)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn token_stops_being_used_before_expiry() {
        let slot = TokenSlot::new();
        assert!(slot.current().is_err());
        let now = Instant::now();
        let token = CurrentToken::new(
            AccessToken::new("t"),
            Duration::from_secs(100),
            now,
            SystemTime::now(),
        );
        let Some(token) = token else {
            panic!("valid token")
        };
        slot.publish_token(token, now + Duration::from_secs(80), SystemTime::now());
        assert!(slot.current().is_ok());
        tokio::time::advance(Duration::from_secs(89)).await;
        assert!(slot.current().is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
        let err = slot.current().err().map(|u| u.reason).unwrap_or_default();
        assert!(err.contains("expired"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_workers_copy_follows_the_slot_and_shares_no_bytes_with_it() {
        let slot = TokenSlot::new();
        let local = slot.local();
        assert!(local.current().is_err(), "no token yet");
        let publish = |secret: &str, lifetime: u64| {
            let now = Instant::now();
            let token = CurrentToken::new(
                AccessToken::new(secret),
                Duration::from_secs(lifetime),
                now,
                SystemTime::now(),
            );
            let Some(token) = token else {
                panic!("valid token")
            };
            slot.publish_token(token, now + Duration::from_secs(80), SystemTime::now());
        };
        publish("first", 100);
        let (Ok(copy), Ok(shared)) = (local.current(), slot.current()) else {
            panic!("a token")
        };
        assert_eq!(copy.header, shared.header);
        assert!(copy.header.is_sensitive());
        assert_ne!(
            copy.header.as_bytes().as_ptr(),
            shared.header.as_bytes().as_ptr()
        );
        assert!(
            local
                .current()
                .is_ok_and(|again| Arc::ptr_eq(&again, &copy)),
            "copied once, not per request"
        );
        slot.publish_failure(
            &TokenError::Connect("down".to_owned()),
            Instant::now() + Duration::from_secs(5),
            SystemTime::now(),
        );
        assert!(
            local
                .current()
                .is_ok_and(|again| Arc::ptr_eq(&again, &copy)),
            "a failure leaves the copy as it is"
        );
        publish("second", 100);
        assert!(local.current().is_ok_and(|t| t.token.secret() == "second"));
        // Expired: the slot's own answer, with its reason.
        tokio::time::advance(Duration::from_secs(90)).await;
        let err = local.current().err().map(|u| u.reason).unwrap_or_default();
        assert!(err.contains("expired"), "{err}");
        assert!(local.clone().current().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn no_forced_renewal_during_a_backoff() {
        let slot = TokenSlot::new();
        let now = Instant::now();
        let Some(token) = CurrentToken::new(
            AccessToken::new("t"),
            Duration::from_secs(100),
            now,
            SystemTime::now(),
        ) else {
            panic!("valid token")
        };
        slot.publish_token(token, now + Duration::from_secs(80), SystemTime::now());
        let error = TokenError::Status {
            status: 503,
            retry_after: Some(Duration::from_secs(20)),
        };
        slot.publish_failure(&error, now + Duration::from_secs(20), SystemTime::now());
        assert!(matches!(
            slot.request_renewal(1, Duration::from_secs(30)),
            Renewal::Declined
        ));
        assert_eq!(slot.state().forced_renewals, 0);
        assert!(
            slot.wait_renewal(1, Duration::from_secs(1)).await.is_none(),
            "nothing pending: no wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_with_the_first_token_or_the_deadline() {
        let slot = TokenSlot::new();
        let waited = slot.current_or_wait(Duration::from_secs(2)).await;
        let Err(u) = waited else {
            panic!("no token was published")
        };
        assert!(u.retry_after_secs >= 1);

        let publisher = slot.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = Instant::now();
            if let Some(token) = CurrentToken::new(
                AccessToken::new("t"),
                Duration::from_secs(60),
                now,
                SystemTime::now(),
            ) {
                publisher.publish_token(token, now + Duration::from_secs(48), SystemTime::now());
            }
        });
        assert!(slot.current_or_wait(Duration::from_secs(5)).await.is_ok());
    }
}
