//! Tokens: the endpoint client, the refresher task that owns the credentials,
//! and the slot that the request path reads.

use std::future::Future;
use std::time::Duration;

use crate::secret::AccessToken;

pub mod assertion;
pub mod endpoint;
pub mod error;
pub mod refresher;
pub mod slot;

pub use endpoint::{CredentialInfo, TokenEndpoint};
pub use error::TokenError;
pub use refresher::{RefreshPolicy, Refresher, RetryPolicy};
pub use slot::{CurrentToken, LocalToken, Renewal, TokenSlot, Unavailable};

/// A token as the provider issued it.
#[derive(Debug)]
pub struct Fetched {
    /// The access token.
    pub token: AccessToken,
    /// Its lifetime (`expires_in`), counted from when the request was sent.
    pub expires_in: Duration,
    /// When the provider asks to renew it (`refresh_in`), if it says.
    pub refresh_in: Option<Duration>,
}

/// Something that issues tokens: the real endpoint, or a fake in tests.
pub trait TokenSource: Send + Sync + 'static {
    /// Requests one token.
    fn fetch(&self) -> impl Future<Output = Result<Fetched, TokenError>> + Send;
}
