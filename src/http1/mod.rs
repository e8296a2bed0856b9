//! HTTP/1.1 on the wire, and nothing else: it names nothing of the crate,
//! so it can be read, tested and changed alone. Each rule about bytes
//! exists once here, for requests and answers alike, and for the lean
//! server and the upstream client alike:
//!
//! - [`field`]: names tagged once ([`Known`]), the one reader of
//!   comma-separated tokens ([`lists`]), the one Content-Length parser
//!   ([`content_length`]), Transfer-Encoding ([`Codings`]), the one field
//!   writer ([`put_field`]).
//! - [`raw`]: a head's fields as they arrived ([`RawFields`]), shared from
//!   its bytes, in their order or a header map's.
//! - [`head`]: request and answer heads parsed and written; what their
//!   fields say about framing ([`Signals`], [`Framing`]).
//! - [`body`]: an answer's body decoded as it arrives ([`Decoder`]), a body's
//!   framing written ([`Encoder`], [`chunk_line`], [`end_chunked`]).
//!
//! Where it follows hyper (framing, limits, the order and case of written
//! fields), it does so on purpose: a client must not be able to tell
//! whether hyper or this code served it.

pub mod body;
pub mod field;
pub mod head;
pub mod raw;

pub use body::Framing;
pub use body::{Decoded, Decoder, Encoder, chunk_line, end_chunked};
pub use field::{
    Codings, Field, FieldValues, Known, content_length, lists, put_field, put_name, takes_trailers,
    visible_ascii,
};
pub use field::{FramingProblem, Offer, upgrade_offer};
pub use head::{
    Answer, Answered, Fields, Parse, RequestHead, RequestLine, ResponseHead, Signals, WriteFields,
    encode_request_head, encode_response_head, has_body, parse_request, parse_response,
};
pub use raw::{RawFields, Span};

/// Why bytes are not HTTP/1.1 that can be read or written on: a message
/// for a log or an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub &'static str);

/// The most header fields a head may have (hyper's limit too).
pub const MAX_HEADERS: usize = 100;

/// The largest head whose fields are passed on as they came: grouping
/// them by name then compares at most a few hundred KiB of names.
pub const RAW_HEAD_LIMIT: usize = 8 * 1024;

/// The HTTP/2 connection preface, which an HTTP/1 server must tell from a
/// request line.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Helpers for the crate's tests.
#[cfg(test)]
pub mod testing;
