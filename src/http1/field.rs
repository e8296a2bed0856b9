//! Header fields one at a time: names tagged once, the one reader of
//! comma-separated tokens (`Connection`, `TE`), the one Content-Length
//! parser, the one Transfer-Encoding reader, and the one field writer.

use std::ops::DerefMut;

use bytes::BufMut;
use http::header::{self, HeaderMap, HeaderName};

use super::Invalid;

const BAD_LENGTH: Invalid = Invalid("its Content-Length values are not one number of digits");

/// The field names that the layers above act on, recognised once per
/// field (by length, then bytes, in any case), so that later steps compare
/// a tag instead of a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Known {
    /// Any other name.
    #[default]
    Other,
    Connection,
    KeepAlive,
    ProxyConnection,
    ProxyAuthenticate,
    ProxyAuthorization,
    Te,
    TransferEncoding,
    Upgrade,
    /// The settings of an h2c upgrade offer (RFC 9113 §3.2.1 of old):
    /// connection-specific.
    Http2Settings,
    ContentLength,
    /// `Content_Length` (any case): a name that a server reading `_` as
    /// `-` (CGI-style stacks do) would take for a framing field. Never
    /// framing here, and a request with one is refused.
    ContentLengthLookalike,
    /// `Transfer_Encoding`, likewise.
    TransferEncodingLookalike,
    Trailer,
    Date,
    Location,
    Expect,
    Host,
    Origin,
    SecFetchSite,
    /// `X-Proxy-Key`, the guard's local key: tagged here so that the guard
    /// and the proxy's cleaning compare a tag, like the others.
    ProxyKey,
    Authorization,
    UserAgent,
    /// `X-Request-Id`: kept when sane, else set by the proxy.
    RequestId,
    /// `traceparent` (W3C Trace Context): passed on, its trace id logged.
    TraceParent,
}

impl Known {
    /// The tag of `name`.
    pub fn of(name: &[u8]) -> Self {
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        match name.len() {
            2 if is(b"te") => Self::Te,
            4 if is(b"host") => Self::Host,
            4 if is(b"date") => Self::Date,
            6 if is(b"expect") => Self::Expect,
            6 if is(b"origin") => Self::Origin,
            7 if is(b"trailer") => Self::Trailer,
            7 if is(b"upgrade") => Self::Upgrade,
            8 if is(b"location") => Self::Location,
            10 if is(b"connection") => Self::Connection,
            10 if is(b"keep-alive") => Self::KeepAlive,
            10 if is(b"user-agent") => Self::UserAgent,
            11 if is(b"x-proxy-key") => Self::ProxyKey,
            11 if is(b"traceparent") => Self::TraceParent,
            12 if is(b"x-request-id") => Self::RequestId,
            13 if is(b"authorization") => Self::Authorization,
            14 if is(b"content-length") => Self::ContentLength,
            14 if is(b"sec-fetch-site") => Self::SecFetchSite,
            14 if is(b"http2-settings") => Self::Http2Settings,
            14 if is(b"content_length") => Self::ContentLengthLookalike,
            17 if is(b"transfer_encoding") => Self::TransferEncodingLookalike,
            16 if is(b"proxy-connection") => Self::ProxyConnection,
            17 if is(b"transfer-encoding") => Self::TransferEncoding,
            18 if is(b"proxy-authenticate") => Self::ProxyAuthenticate,
            19 if is(b"proxy-authorization") => Self::ProxyAuthorization,
            _ => Self::Other,
        }
    }

    /// Describes one connection, not the message (RFC 9110 §7.6.1, plus
    /// the non-standard `Proxy-Connection` and `Keep-Alive`, and h2c's
    /// `HTTP2-Settings`).
    pub fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Self::Connection
                | Self::KeepAlive
                | Self::ProxyConnection
                | Self::ProxyAuthenticate
                | Self::ProxyAuthorization
                | Self::Te
                | Self::TransferEncoding
                | Self::Upgrade
                | Self::Http2Settings
        )
    }
}

/// A field name as a header map and fields as they arrived look it up.
#[derive(Debug)]
pub struct Field {
    /// For a header map.
    pub name: HeaderName,
    /// For fields as they arrived.
    pub known: Known,
}

impl Field {
    /// A name and its tag (which must be `Known::of` the name).
    pub const fn new(name: HeaderName, known: Known) -> Self {
        Self { name, known }
    }
}

pub const HOST: Field = Field::new(header::HOST, Known::Host);
pub const ORIGIN: Field = Field::new(header::ORIGIN, Known::Origin);
pub const SEC_FETCH_SITE: Field = Field::new(
    HeaderName::from_static("sec-fetch-site"),
    Known::SecFetchSite,
);
pub const UPGRADE: Field = Field::new(header::UPGRADE, Known::Upgrade);
pub const CONNECTION: Field = Field::new(header::CONNECTION, Known::Connection);
pub const TE: Field = Field::new(header::TE, Known::Te);
pub const EXPECT: Field = Field::new(header::EXPECT, Known::Expect);
pub const CONTENT_LENGTH: Field = Field::new(header::CONTENT_LENGTH, Known::ContentLength);
pub const TRANSFER_ENCODING: Field = Field::new(header::TRANSFER_ENCODING, Known::TransferEncoding);
pub const X_REQUEST_ID: Field = Field::new(
    header::HeaderName::from_static("x-request-id"),
    Known::RequestId,
);
pub const TRACEPARENT: Field = Field::new(
    header::HeaderName::from_static("traceparent"),
    Known::TraceParent,
);

/// A message's header fields, in a map or as they arrived: what the layers
/// above read of them, one rule for both.
pub trait FieldValues {
    /// The values of `field`'s name, in order.
    fn values_of<'a>(&'a self, field: &Field) -> impl Iterator<Item = &'a [u8]>;

    /// The tags of every field, in order.
    fn tags(&self) -> impl Iterator<Item = Known>;

    /// The first value of `field`'s name.
    fn first(&self, field: &Field) -> Option<&[u8]> {
        self.values_of(field).next()
    }

    /// Whether a value of `field` lists `token` (case-insensitively), as
    /// `Connection: keep-alive, Upgrade` or `TE: trailers` do.
    fn lists_token(&self, field: &Field, token: &str) -> bool {
        self.values_of(field)
            .any(|value| lists(value, token.as_bytes()))
    }
}

impl FieldValues for HeaderMap {
    fn values_of<'a>(&'a self, field: &Field) -> impl Iterator<Item = &'a [u8]> {
        self.get_all(&field.name)
            .into_iter()
            .map(header::HeaderValue::as_bytes)
    }

    fn tags(&self) -> impl Iterator<Item = Known> {
        self.keys().map(|name| Known::of(name.as_str().as_bytes()))
    }
}

/// Whether the client sent `TE: trailers`: it can take trailers.
pub fn takes_trailers(fields: &impl FieldValues) -> bool {
    fields.lists_token(&TE, "trailers")
}

/// What a request offers to upgrade its connection to (RFC 9110 §7.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Nothing: no Upgrade field, or one that `Connection` does not name
    /// (which does not count).
    None,
    /// Only h2c: optional, and ignored by a server that stays on HTTP/1.1.
    H2c,
    /// WebSocket (RFC 6455).
    WebSocket,
    /// Another protocol, named as the client named it.
    Other(String),
}

/// What the request's `Upgrade` and `Connection` fields offer.
pub fn upgrade_offer(fields: &impl FieldValues) -> Offer {
    if fields.first(&UPGRADE).is_none() || !fields.lists_token(&CONNECTION, "upgrade") {
        return Offer::None;
    }
    let mut offer = Offer::None;
    for token in fields.values_of(&UPGRADE).flat_map(tokens) {
        let name = token.split(|b| *b == b'/').next().unwrap_or(token);
        if name.eq_ignore_ascii_case(b"websocket") {
            return Offer::WebSocket;
        }
        if token.eq_ignore_ascii_case(b"h2c") {
            if offer == Offer::None {
                offer = Offer::H2c;
            }
        } else if !matches!(offer, Offer::Other(_)) {
            offer = Offer::Other(String::from_utf8_lossy(token).into_owned());
        }
    }
    offer
}

/// What makes a request's framing one that an intermediary must not pass
/// on, if anything: a name that looks like a framing field's, or a
/// transfer coding other than one `chunked`. Cheap when neither is there.
pub fn request_problem(fields: &impl FieldValues) -> Option<FramingProblem> {
    let mut coded = false;
    for known in fields.tags() {
        match known {
            Known::ContentLengthLookalike | Known::TransferEncodingLookalike => {
                return Some(FramingProblem::Lookalike);
            }
            Known::TransferEncoding => coded = true,
            _ => {}
        }
    }
    if coded {
        let mut codings = Codings::default();
        for value in fields.values_of(&TRANSFER_ENCODING) {
            codings.add(value);
        }
        if codings.other {
            return Some(FramingProblem::Coding);
        }
    }
    None
}

/// A request's framing that an intermediary must not pass on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingProblem {
    /// `Content_Length` or `Transfer_Encoding`: another server may read it
    /// as the framing field and see another message than the proxy does.
    Lookalike,
    /// A transfer coding other than one `chunked` (RFC 9112 §6.1: 501).
    Coding,
}

/// Whether a comma-separated list names `token` (case-insensitively): the
/// one reader of `Connection` and `TE` tokens. On bytes, not validated
/// strings: this runs several times per request.
pub fn lists(value: &[u8], token: &[u8]) -> bool {
    // Most values are the one token, as it is.
    value.eq_ignore_ascii_case(token) || tokens(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// The items of a comma-separated list, trimmed, empty ones skipped.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The one Content-Length rule, for requests and answers alike (hyper's
/// too): every value, and every item of a comma-separated value, is the
/// same number of decimal digits. `Ok(None)`: there is no Content-Length.
pub fn content_length<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<Option<u64>, Invalid> {
    let mut length = Ok(None);
    for value in values {
        add_content_length(&mut length, value);
    }
    length
}

/// "00" to "99", for writing two digits at a time.
const PAIRS: [u8; 200] = {
    let mut pairs = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        pairs[2 * i] = b'0' + (i / 10) as u8;
        pairs[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    pairs
};

/// `n` in decimal, as a Content-Length has it (written by hand, two
/// digits at a time: through `write!` it costs several times more, on
/// every answer).
pub fn put_decimal(dst: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        at -= 1;
        digits[at] = b'0' + n as u8;
    }
    dst.extend_from_slice(&digits[at..]);
}

/// [`content_length`] one value at a time, for a reader that sees every
/// field once: `length` holds what the values so far say.
pub fn add_content_length(length: &mut Result<Option<u64>, Invalid>, value: &[u8]) {
    for item in value.split(|b| *b == b',') {
        let item = item.trim_ascii();
        let digits = !item.is_empty() && item.iter().all(u8::is_ascii_digit);
        let parsed = digits
            .then(|| std::str::from_utf8(item).ok()?.parse::<u64>().ok())
            .flatten();
        *length = match (parsed, *length) {
            (Some(parsed), Ok(None)) => Ok(Some(parsed)),
            (Some(parsed), Ok(Some(seen))) if parsed == seen => Ok(Some(seen)),
            _ => Err(BAD_LENGTH),
        };
    }
}

/// What a message's Transfer-Encoding values say, read as hyper reads
/// them (only visible ASCII counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Codings {
    /// There is a Transfer-Encoding field.
    pub present: bool,
    /// The last coding is `chunked`: the body is framed by chunks.
    pub chunked: bool,
    /// Some coding is not `chunked`, or `chunked` comes more than once:
    /// a request's body would reach the upstream still coded.
    pub other: bool,
}

impl Codings {
    /// Adds one Transfer-Encoding value (values come in order).
    pub fn add(&mut self, value: &[u8]) {
        let Some(value) = visible_ascii(value) else {
            self.present = true;
            self.chunked = false;
            self.other = true;
            return;
        };
        for coding in value.split(',') {
            let coding = coding.trim_ascii();
            let chunked = coding.eq_ignore_ascii_case("chunked");
            self.other |= !chunked || self.chunked;
            self.present = true;
            self.chunked = chunked;
        }
    }
}

/// A field value as text, if it is visible ASCII (tabs allowed): what
/// `HeaderValue::to_str` gives.
pub fn visible_ascii(value: &[u8]) -> Option<&str> {
    if value.iter().all(|b| *b == b'\t' || (32..127).contains(b)) {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// A field name as hyper writes it: in lower case.
pub fn put_name<B: BufMut + DerefMut<Target = [u8]>>(dst: &mut B, name: &[u8]) {
    let start = dst.len();
    dst.put_slice(name);
    if let Some(written) = dst.get_mut(start..) {
        written.make_ascii_lowercase();
    }
}

/// Writes one field line, `name: value\r\n`, the name in lower case: the
/// one field writer, for request heads, answer heads and trailers.
pub fn put_field<B: BufMut + DerefMut<Target = [u8]>>(dst: &mut B, name: &[u8], value: &[u8]) {
    put_name(dst, name);
    dst.put_slice(b": ");
    dst.put_slice(value);
    dst.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_written_as_display_writes_them() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut cases: Vec<u64> = (0..=1000).collect();
        cases.extend([9_999, 10_000, 99_999, 100_000, u64::MAX, u64::MAX - 1]);
        cases.extend((0..2000).map(|_| rng.u64(..) >> rng.u32(0..64)));
        for n in cases {
            let mut out = Vec::new();
            put_decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes(), "{n}");
        }
    }

    #[test]
    fn known_names_are_recognised_in_any_case() {
        let hop_by_hop = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "transfer-encoding",
            "upgrade",
        ];
        for name in hop_by_hop {
            assert!(Known::of(name.as_bytes()).is_hop_by_hop(), "{name}");
            let upper = name.to_ascii_uppercase();
            assert!(Known::of(upper.as_bytes()).is_hop_by_hop(), "{upper}");
        }
        for name in [
            "content-length",
            "Trailer",
            "DATE",
            "location",
            "Expect",
            "Host",
            "origin",
            "Sec-Fetch-Site",
            "X-Proxy-Key",
            "AUTHORIZATION",
            "user-agent",
        ] {
            let known = Known::of(name.as_bytes());
            assert!(known != Known::Other && !known.is_hop_by_hop(), "{name}");
        }
        assert!(Known::of(b"HTTP2-Settings").is_hop_by_hop());
        for name in ["Content_Length", "transfer_ENCODING"] {
            assert!(matches!(
                Known::of(name.as_bytes()),
                Known::ContentLengthLookalike | Known::TransferEncodingLookalike
            ));
        }
        for name in [
            "",
            "t",
            "hosts",
            "x-connection",
            "connectio",
            "content-type",
        ] {
            assert_eq!(Known::of(name.as_bytes()), Known::Other, "{name}");
        }
    }

    #[test]
    fn upgrade_offers() {
        let offer = |fields: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in fields {
                map.append(*name, header::HeaderValue::from_static(value));
            }
            upgrade_offer(&map)
        };
        let upgrade = ("connection", "keep-alive, Upgrade, HTTP2-Settings");
        assert_eq!(offer(&[]), Offer::None);
        assert_eq!(offer(&[("upgrade", "websocket")]), Offer::None);
        assert_eq!(offer(&[upgrade, ("upgrade", "h2c")]), Offer::H2c);
        assert_eq!(
            offer(&[upgrade, ("upgrade", "WebSocket")]),
            Offer::WebSocket
        );
        assert_eq!(
            offer(&[upgrade, ("upgrade", "h2c, websocket/13")]),
            Offer::WebSocket
        );
        assert_eq!(
            offer(&[upgrade, ("upgrade", "h2c, TLS/1.0")]),
            Offer::Other("TLS/1.0".to_owned())
        );
    }

    #[test]
    fn one_content_length_rule() {
        let parse = |values: &[&str]| content_length(values.iter().map(|v| v.as_bytes()));
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&["0"]), Ok(Some(0)));
        assert_eq!(parse(&["12"]), Ok(Some(12)));
        assert_eq!(parse(&["12", "12"]), Ok(Some(12)));
        assert_eq!(parse(&["12, 12"]), Ok(Some(12)));
        assert_eq!(parse(&[" 7 "]), Ok(Some(7)));
        for bad in [
            &["12", "13"][..],
            &["12, 13"],
            &["-1"],
            &["+1"],
            &[""],
            &["1,"],
            &["0x10"],
            &["1 2"],
            &["99999999999999999999999"],
        ] {
            assert_eq!(parse(bad), Err(BAD_LENGTH), "{bad:?}");
        }
    }

    #[test]
    fn transfer_codings() {
        let read = |values: &[&[u8]]| {
            let mut codings = Codings::default();
            for value in values {
                codings.add(value);
            }
            codings
        };
        let chunked = Codings {
            present: true,
            chunked: true,
            other: false,
        };
        assert_eq!(read(&[b"chunked"]), chunked);
        assert_eq!(read(&[b" Chunked "]), chunked);
        assert_eq!(read(&[]), Codings::default());
        for (values, last_chunked) in [
            (&[&b"gzip, chunked"[..]][..], true),
            (&[b"cow, chunked"], true),
            (&[b"gzip", b"chunked"], true),
            (&[b"chunked, chunked"], true),
            (&[b"chunked", b"chunked"], true),
            (&[b"chunked, gzip"], false),
            (&[b"gzip"], false),
            (&[b"chunked\xff"], false),
        ] {
            let codings = read(values);
            assert!(codings.present && codings.other, "{values:?}");
            assert_eq!(codings.chunked, last_chunked, "{values:?}");
        }
    }

    #[test]
    fn tokens_are_read_in_any_case_and_spacing() {
        assert!(lists(b"close", b"close"));
        assert!(lists(b"Keep-Alive , Upgrade", b"upgrade"));
        assert!(!lists(b"keep-alive", b"close"));
        assert!(!lists(b"closed", b"close"));
        assert_eq!(tokens(b" a, ,b ,").collect::<Vec<_>>(), [&b"a"[..], b"b"]);
    }

    #[test]
    fn one_field_writer() {
        let mut out = Vec::new();
        put_field(&mut out, b"X-Mixed-Case", b"Value");
        assert_eq!(out, b"x-mixed-case: Value\r\n");
    }
}
