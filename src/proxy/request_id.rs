//! Request ids: the client's `X-Request-Id` when it is a sane token, else
//! a new one; sent upstream, returned to the client, and in every log line
//! about the request. And the W3C trace id of a `traceparent`, for the
//! access log (the field itself passes on unchanged).

use bytes::Bytes;
use http::HeaderValue;

use crate::http1::field::{CONNECTION, TRACEPARENT, X_REQUEST_ID};
use crate::http1::{FieldValues, Fields};

/// The longest client id kept.
const MAX_LEN: usize = 128;

/// A request's id, and whether the proxy must set it on the way up.
#[derive(Debug, Clone)]
pub(crate) struct RequestId {
    pub value: HeaderValue,
    /// The client sent none, or one that was not sane (then it is
    /// replaced): the proxy sets it upstream.
    pub set_upstream: bool,
}

impl RequestId {
    /// The client's, when it sent one sane `X-Request-Id`, else a new one.
    pub(crate) fn of(fields: &Fields) -> Self {
        let field = X_REQUEST_ID;
        let mut sent = fields.values_of(&field);
        if let (Some(value), None) = (sent.next(), sent.next())
            && is_sane(value)
            // Named in Connection, it is hop-by-hop and goes no further.
            && !fields.lists_token(&CONNECTION, "x-request-id")
            && let Ok(value) = HeaderValue::from_bytes(value)
        {
            return Self {
                value,
                set_upstream: false,
            };
        }
        Self {
            value: generate(),
            set_upstream: true,
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        // Sane or generated: visible ASCII.
        self.value.to_str().unwrap_or_default()
    }
}

/// Up to 128 characters that need no quoting in a log or a header:
/// letters, digits and `-_.:/+=@~`.
fn is_sane(value: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@~".contains(b))
}

/// 128 random bits in hex, as nginx's `$request_id` (written by hand:
/// `format!` costs several times more, on every request).
fn generate() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = fastrand::u128(..);
    let mut text = [0u8; 32];
    for (at, digit) in text.iter_mut().enumerate() {
        *digit = HEX[(bits >> (124 - 4 * at) & 0xf) as usize];
    }
    HeaderValue::from_maybe_shared(Bytes::copy_from_slice(&text))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The trace id of a valid `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`,
/// not all zeros), for the log.
pub(crate) fn trace_id(fields: &Fields) -> Option<String> {
    let value = fields.first(&TRACEPARENT)?;
    let mut parts = value.split(|b| *b == b'-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |part: &[u8], len: usize| {
        part.len() == len && part.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = hex(version, 2)
        && version != b"ff"
        && hex(trace, 32)
        && trace.iter().any(|b| *b != b'0')
        && hex(parent, 16)
        && hex(flags, 2);
    valid.then(|| String::from_utf8_lossy(trace).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&'static str, &'static str)]) -> Fields {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        Fields::Map(map)
    }

    #[test]
    fn a_sane_client_id_is_kept_and_any_other_replaced() {
        let kept = RequestId::of(&fields(&[("x-request-id", "abc-123_x:y/z=+@~.")]));
        assert_eq!(
            (kept.as_str(), kept.set_upstream),
            ("abc-123_x:y/z=+@~.", false)
        );
        for bad in [
            vec![("x-request-id", "has space")],
            vec![("x-request-id", "")],
            vec![("x-request-id", "quote\"")],
            vec![("x-request-id", "a"), ("x-request-id", "b")],
            vec![("x-request-id", "a"), ("connection", "x-request-id")],
            vec![],
        ] {
            let id = RequestId::of(&fields(&bad));
            assert!(id.set_upstream, "{bad:?}");
            assert_eq!(id.as_str().len(), 32);
            assert!(id.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        }
        let long = "a".repeat(129);
        let mut map = http::HeaderMap::new();
        map.insert(
            "x-request-id",
            HeaderValue::from_str(&long).unwrap_or(HeaderValue::from_static("")),
        );
        assert!(RequestId::of(&Fields::Map(map)).set_upstream);
    }

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let good = format!("00-{id}-00f067aa0ba902b7-01");
        let mut map = http::HeaderMap::new();
        map.insert(
            "traceparent",
            HeaderValue::from_str(&good).unwrap_or(HeaderValue::from_static("")),
        );
        assert_eq!(trace_id(&Fields::Map(map)).as_deref(), Some(id));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "nonsense",
        ] {
            assert_eq!(trace_id(&fields(&[("traceparent", bad)])), None, "{bad}");
        }
    }
}
