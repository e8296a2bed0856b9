//! Secrets as types: the client secret, assertions and the access token never print.
//!
//! Each newtype's `Debug` prints `Name([redacted])`, none has `Display`, and
//! the value is reached only through an explicit `.secret()` call, so a stray
//! `{:?}` in a log line cannot leak one.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

macro_rules! secret_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name(SecretString);

        impl $name {
            /// Wraps a value.
            pub fn new(value: impl Into<String>) -> Self {
                Self(SecretString::from(value.into()))
            }

            /// The value itself: every call site is a place where it leaves the type.
            pub fn secret(&self) -> &str {
                self.0.expose_secret()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }
    };
}

secret_newtype!(
    /// The OAuth2 client secret.
    ClientSecret
);
secret_newtype!(
    /// A client assertion: a signed JWT, or a federated token.
    Assertion
);
secret_newtype!(
    /// An access token issued by the token endpoint.
    AccessToken
);
secret_newtype!(
    /// The key local clients send in `X-Proxy-Key`, when one is required.
    LocalKey
);
secret_newtype!(
    /// A forward proxy's URL, which may carry `user:password`.
    ProxyUrl
);

impl LocalKey {
    /// Compares with what a client sent, in time that depends only on the
    /// lengths, so the key cannot be guessed byte by byte from timing.
    pub fn matches(&self, offered: &[u8]) -> bool {
        let expected = self.secret().as_bytes();
        let mut diff = expected.len() ^ offered.len();
        for (i, byte) in expected.iter().enumerate() {
            diff |= usize::from(byte ^ offered.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_key_comparison() {
        let key = LocalKey::new("0123456789abcdef");
        assert!(key.matches(b"0123456789abcdef"));
        assert!(!key.matches(b"0123456789abcdeF"));
        assert!(!key.matches(b"0123456789abcde"));
        assert!(!key.matches(b"0123456789abcdef0"));
        assert!(!key.matches(b""));
        assert_eq!(format!("{key:?}"), "LocalKey([redacted])");
    }

    #[test]
    fn debug_is_redacted() {
        let secret = ClientSecret::new("hunter2");
        let token = AccessToken::new("eyJ0eXAi");
        assert_eq!(format!("{secret:?}"), "ClientSecret([redacted])");
        assert_eq!(format!("{token:?}"), "AccessToken([redacted])");
        assert_eq!(secret.secret(), "hunter2");
        assert_eq!(token.secret(), "eyJ0eXAi");
    }
}
