//! Heads: a request's and an answer's, parsed and written; what their
//! fields say about framing and the connection (one `Signals` for both).

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, Method, StatusCode, Uri, Version};
use hyper::ext::ReasonPhrase;

use super::body::{Encoder, Framing};
use super::field::{
    Codings, Field, FieldValues, Known, add_content_length, content_length, lists, put_decimal,
    put_field, put_name, tokens, visible_ascii,
};
use super::raw::{RawFields, Span, record_spans};
use super::{Invalid, MAX_HEADERS};

/// A message's header fields: in a header map, or as they arrived.
#[derive(Debug)]
pub enum Fields {
    Map(HeaderMap),
    Raw(RawFields),
}

impl Fields {
    /// The fields in a header map.
    pub fn into_map(self) -> Result<HeaderMap, String> {
        match self {
            Self::Map(map) => Ok(map),
            Self::Raw(raw) => raw.into_map(),
        }
    }
}

/// One of two iterators.
enum Either<A, B> {
    A(A),
    B(B),
}

impl<T, A: Iterator<Item = T>, B: Iterator<Item = T>> Iterator for Either<A, B> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match self {
            Self::A(a) => a.next(),
            Self::B(b) => b.next(),
        }
    }
}

impl FieldValues for Fields {
    fn values_of<'a>(&'a self, field: &Field) -> impl Iterator<Item = &'a [u8]> {
        match self {
            Self::Map(map) => Either::A(map.values_of(field)),
            Self::Raw(raw) => Either::B(raw.values_of(field)),
        }
    }

    fn tags(&self) -> impl Iterator<Item = Known> {
        match self {
            Self::Map(map) => Either::A(map.tags()),
            Self::Raw(raw) => Either::B(raw.tags()),
        }
    }
}

/// A request's head.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub fields: Fields,
}

impl RequestHead {
    /// From a request's parts (its extensions stay behind).
    pub fn from_parts(parts: http::request::Parts) -> Self {
        Self {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            fields: Fields::Map(parts.headers),
        }
    }
}

/// An answer's head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// A reason phrase other than the status code's usual one.
    pub reason: Option<ReasonPhrase>,
    pub fields: Fields,
}

impl ResponseHead {
    /// From a response's parts (extensions other than the reason stay behind).
    pub fn from_parts(mut parts: http::response::Parts) -> Self {
        Self {
            status: parts.status,
            version: parts.version,
            reason: parts.extensions.remove::<ReasonPhrase>(),
            fields: Fields::Map(parts.headers),
        }
    }

    /// The response's parts, its fields in a header map.
    pub fn into_parts(self) -> Result<http::response::Parts, String> {
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = self.status;
        parts.version = self.version;
        parts.headers = self.fields.into_map()?;
        if let Some(reason) = self.reason {
            parts.extensions.insert(reason);
        }
        Ok(parts)
    }
}

/// What a head's fields say about the body's framing and the connection,
/// read in one pass.
#[derive(Debug, Clone, Copy)]
pub struct Signals {
    pub codings: Codings,
    /// How many Content-Length fields there are.
    pub content_lengths: usize,
    /// A Content-Length value is a comma-separated list.
    pub length_list: bool,
    /// What the Content-Length fields say (see [`content_length`]).
    pub length: Result<Option<u64>, Invalid>,
    /// `Connection` lists `close`.
    pub close: bool,
    /// `Connection` lists `keep-alive`.
    pub keep_alive: bool,
    /// An Upgrade token other than `h2c` (which a server may ignore).
    pub upgrade_other: bool,
    pub expect: bool,
    /// A name that looks like a framing field's (see
    /// [`Known::ContentLengthLookalike`]).
    pub lookalike: bool,
}

impl Default for Signals {
    fn default() -> Self {
        Self {
            codings: Codings::default(),
            content_lengths: 0,
            length_list: false,
            length: Ok(None),
            close: false,
            keep_alive: false,
            upgrade_other: false,
            expect: false,
            lookalike: false,
        }
    }
}

impl Signals {
    /// Reads the fields, tagged, in order.
    pub fn read<'a>(fields: impl Iterator<Item = (Known, &'a [u8])>) -> Self {
        let mut signals = Self::default();
        for (known, value) in fields {
            match known {
                Known::TransferEncoding => signals.codings.add(value),
                Known::ContentLength => {
                    signals.content_lengths += 1;
                    signals.length_list |= value.contains(&b',');
                    add_content_length(&mut signals.length, value);
                }
                Known::Connection => {
                    for token in tokens(value) {
                        if token.eq_ignore_ascii_case(b"close") {
                            signals.close = true;
                        } else if token.eq_ignore_ascii_case(b"keep-alive") {
                            signals.keep_alive = true;
                        }
                    }
                }
                Known::Upgrade => {
                    signals.upgrade_other |= tokens(value).any(|t| !t.eq_ignore_ascii_case(b"h2c"));
                }
                Known::Expect => signals.expect = true,
                Known::ContentLengthLookalike | Known::TransferEncodingLookalike => {
                    signals.lookalike = true;
                }
                _ => {}
            }
        }
        signals
    }
}

/// Whether an answer to `method` with `status` has a body: not to HEAD,
/// not 1xx, 204 or 304 (RFC 9110 §6.4.1).
pub fn has_body(method: &Method, status: StatusCode) -> bool {
    method != Method::HEAD && may_have_length(status)
}

/// Whether an answer with `status` may carry Content-Length (a HEAD
/// answer may: it gives the GET's).
pub fn may_have_length(status: StatusCode) -> bool {
    !status.is_informational()
        && !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
}

/// The outcome of parsing a head from the start of a buffer.
#[derive(Debug)]
pub enum Parse<T> {
    Complete(T),
    Partial,
}

const MALFORMED: Invalid = Invalid("a malformed request head");

/// A request head, parsed: where its parts lie in the buffer.
#[derive(Debug)]
pub struct RequestLine {
    pub method: Method,
    /// The request target, in the buffer.
    pub target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// The head's length, its empty line included.
    pub length: usize,
    /// How many of the spans hold fields.
    pub count: usize,
    pub signals: Signals,
}

/// Parses a request head at the start of `buf`, recording where its
/// fields lie in `spans`. `Err`: malformed, too many fields, or a method
/// that is not a token.
pub fn parse_request(
    buf: &[u8],
    spans: &mut [Span; MAX_HEADERS],
) -> Result<Parse<RequestLine>, Invalid> {
    // Uninitialised slots: initialising a hundred of them cost more than
    // parsing a typical head.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let length = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(Parse::Partial),
        Err(_) => return Err(MALFORMED),
    };
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(MALFORMED);
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| MALFORMED)?;
    let count = request.headers.len();
    record_spans(buf, length, request.headers, spans).ok_or(MALFORMED)?;
    let target = (target.as_ptr() as usize)
        .checked_sub(buf.as_ptr() as usize)
        .map(|start| start..start + target.len())
        .filter(|range| range.end <= length)
        .ok_or(MALFORMED)?;
    let signals = Signals::read(
        spans[..count]
            .iter()
            .zip(request.headers.iter())
            .map(|(span, field)| (span.known, field.value)),
    );
    Ok(Parse::Complete(RequestLine {
        method,
        target,
        version,
        length,
        count,
        signals,
    }))
}

/// An answer's head, read; its body still on the connection.
#[derive(Debug)]
pub struct Answer {
    /// Its fields as they arrived.
    pub head: ResponseHead,
    pub framing: Framing,
    /// The connection may carry another request after the body.
    pub keep_alive: bool,
}

/// What reading an answer's head gave.
#[derive(Debug)]
pub enum Answered {
    Complete(Answer),
    /// A 1xx answer, taken off the buffer: the real one follows.
    Informational,
    Partial,
}

/// Parses the answer to a `method` request at the start of `buf`, and
/// takes it off. `Err`: why it is not HTTP/1.1 that can be passed on.
pub fn parse_response(buf: &mut BytesMut, method: &Method) -> Result<Answered, String> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots,
    );
    let length = match parsed {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(Answered::Partial),
        Err(error) => return Err(format!("its response head is malformed: {error}")),
    };
    let code = response.code.unwrap_or_default();
    let status =
        StatusCode::from_u16(code).map_err(|_| format!("its status code {code} is not valid"))?;
    if status.is_informational() && code != 101 {
        buf.advance(length);
        return Ok(Answered::Informational);
    }
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut spans = [Span::default(); MAX_HEADERS];
    let count = response.headers.len();
    record_spans(buf, length, response.headers, &mut spans)
        .ok_or("a header field could not be read")?;
    let signals = Signals::read(
        spans[..count]
            .iter()
            .zip(response.headers.iter())
            .map(|(span, field)| (span.known, field.value)),
    );
    let framing = response_framing(method, status, version, &signals)?;
    // Copied, as hyper does: rare, and httparse may give an empty or
    // non-ASCII reason from outside the buffer.
    let reason = response
        .reason
        .filter(|reason| !reason.is_empty() && Some(*reason) != status.canonical_reason())
        .map(|reason| Bytes::copy_from_slice(reason.as_bytes()))
        .and_then(|reason| ReasonPhrase::try_from(reason).ok());
    // What a header map takes (httparse has checked the bytes).
    if response
        .headers
        .iter()
        .any(|field| field.name.len() > usize::from(u16::MAX))
    {
        return Err("a header name is not valid".to_owned());
    }
    // As hyper's client, the fields are passed on as they came, even a
    // Content-Length beside Transfer-Encoding (which the proxy removes).
    let fields = RawFields::new(buf.split_to(length).freeze(), &spans[..count]);
    let both = signals.codings.present && signals.content_lengths > 0;
    let keep_alive = framing != Framing::Close
        && code != 101
        && !both
        && !signals.close
        && (version == Version::HTTP_11 || signals.keep_alive);
    Ok(Answered::Complete(Answer {
        head: ResponseHead {
            status,
            version,
            reason,
            fields: Fields::Raw(fields),
        },
        framing,
        keep_alive,
    }))
}

/// RFC 9112 §6.3, as hyper's client applies it.
fn response_framing(
    method: &Method,
    status: StatusCode,
    version: Version,
    signals: &Signals,
) -> Result<Framing, String> {
    if !has_body(method, status) || status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Framing::Empty);
    }
    if signals.codings.present {
        if version == Version::HTTP_10 {
            return Err("an HTTP/1.0 response has Transfer-Encoding".to_owned());
        }
        // Chunked only if it is the final coding.
        return Ok(if signals.codings.chunked {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    let length = signals.length.map_err(|invalid| invalid.to_string())?;
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// Header fields to be written out, one `name: value` at a time.
pub trait WriteFields {
    /// About how many bytes they take.
    fn size_hint(&self) -> usize;

    /// Each field, in order.
    fn for_each_field(&self, put: impl FnMut(&[u8], &[u8]));

    /// The same fields in a header map (for hyper's client).
    fn to_map(&self) -> Result<HeaderMap, String>;
}

impl WriteFields for HeaderMap {
    fn size_hint(&self) -> usize {
        self.iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum()
    }

    fn for_each_field(&self, mut put: impl FnMut(&[u8], &[u8])) {
        for (name, value) in self {
            put(name.as_str().as_bytes(), value.as_bytes());
        }
    }

    fn to_map(&self) -> Result<HeaderMap, String> {
        Ok(self.clone())
    }
}

/// The request line and header fields, as hyper's client writes them
/// (names in lower case, in the fields' order); with `chunked`, the body's
/// framing is announced after them, where hyper's client adds it.
pub fn encode_request_head(
    out: &mut BytesMut,
    method: &Method,
    target: &str,
    fields: &impl WriteFields,
    chunked: bool,
) {
    out.reserve(method.as_str().len() + target.len() + 13 + fields.size_hint());
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    fields.for_each_field(|name, value| put_field(out, name, value));
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

const UNFRAMEABLE: Invalid = Invalid("an answer whose framing fields disagree");

/// Writes an answer's head into `dst` as hyper's server does (lower-case
/// names, `date` added, the body's length or chunking declared), and says
/// how to frame the body and whether the connection ends after it.
/// `length`: `None` for no body, else the exact size if known. `date`: the
/// current date as an HTTP date, called only if the head has none.
pub fn encode_response_head(
    dst: &mut Vec<u8>,
    method: &Method,
    head: &mut ResponseHead,
    length: Option<Option<u64>>,
    keep_alive: bool,
    date: impl FnOnce(&mut Vec<u8>),
) -> Result<(Encoder, bool), Invalid> {
    let mut length = length;
    let mut last = !keep_alive;
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        last = true;
    } else if head.status.is_informational() {
        // hyper's server cannot send these either; nor can they arrive.
        head.fields = Fields::Map(HeaderMap::new());
        head.reason = None;
        head.status = StatusCode::INTERNAL_SERVER_ERROR;
        length = None;
        last = true;
    }
    let status = head.status;
    let http10 = head.version == Version::HTTP_10;
    if status == StatusCode::OK && head.reason.is_none() && !http10 {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
        dst.extend_from_slice(status.as_str().as_bytes());
        dst.push(b' ');
        match &head.reason {
            Some(reason) => dst.extend_from_slice(reason.as_bytes()),
            None => dst.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        dst.extend_from_slice(b"\r\n");
    }
    let chunkable = has_body(method, status) && !http10;
    // With a body of unknown size, the fields' Content-Length frames it.
    // A HEAD's answer gives the GET's length: passed on, once.
    let head_answer = length.is_none() && *method == Method::HEAD;
    let declared = if length == Some(None) || head_answer {
        match &head.fields {
            Fields::Map(map) => content_length(map.values_of(&super::field::CONTENT_LENGTH)),
            Fields::Raw(raw) => content_length(raw.values(Known::ContentLength)),
        }
    } else {
        Ok(None)
    };
    let mut encoder = Encoder::Length(0);
    let mut wrote_length = false;
    let mut wrote_content_length = false;
    let mut wrote_date = false;
    let mut allowed: Option<Vec<HeaderName>> = None;
    // Closing, hyper's server adds `close` to the Connection field unless
    // it lists it: at the end of its values, or as a field of its own last.
    let mut add_close = !keep_alive;
    // A field whose values are joined on one line (encoding, connection,
    // trailer) is open while its values come.
    let mut open: Option<Known> = None;
    let mut must_chunk = false;
    let end_line = |dst: &mut Vec<u8>, open: Known, must_chunk: bool, add_close: &mut bool| {
        if *add_close && open == Known::Connection {
            dst.extend_from_slice(b", close");
            *add_close = false;
        }
        dst.extend_from_slice(if must_chunk {
            b", chunked\r\n"
        } else {
            b"\r\n"
        });
    };
    let mut from_map;
    let mut from_raw;
    let fields: &mut dyn Iterator<Item = (Known, &[u8], &[u8])> = match &head.fields {
        Fields::Raw(raw) => {
            from_raw = raw.grouped();
            &mut from_raw
        }
        Fields::Map(map) => {
            from_map = map.iter().map(|(name, value)| {
                let name = name.as_str().as_bytes();
                (Known::of(name), name, value.as_bytes())
            });
            &mut from_map
        }
    };
    for (known, name, value) in fields {
        // Only known names are ever open.
        let continued = open == Some(known);
        if !continued && let Some(open) = open.take() {
            end_line(dst, open, must_chunk, &mut add_close);
        }
        let start_or_join = |dst: &mut Vec<u8>| {
            if continued {
                dst.extend_from_slice(b", ");
            } else {
                put_name(dst, name);
                dst.extend_from_slice(b": ");
            }
            dst.extend_from_slice(value);
        };
        match known {
            Known::ContentLength => {
                // One line, the length that frames the body: later fields
                // of the name (which `declared` found to agree) are left out.
                if wrote_content_length {
                    continue;
                }
                let size = match length {
                    Some(Some(size)) => size,
                    None if *method != Method::HEAD => continue,
                    // A body of unknown size, or a HEAD's answer.
                    Some(None) | None => declared?.ok_or(UNFRAMEABLE)?,
                };
                if wrote_length {
                    // Transfer-Encoding came first.
                    return Err(UNFRAMEABLE);
                }
                if length.is_some() {
                    encoder = Encoder::Length(size);
                }
                wrote_length = true;
                wrote_content_length = true;
                dst.extend_from_slice(b"content-length: ");
                put_decimal(dst, size);
                dst.extend_from_slice(b"\r\n");
                continue;
            }
            Known::TransferEncoding => {
                if wrote_length && !continued {
                    return Err(UNFRAMEABLE);
                }
                if !chunkable {
                    continue;
                }
                wrote_length = true;
                must_chunk = !lists_chunked_last(value);
                if !continued {
                    encoder = Encoder::Chunked(None);
                    open = Some(known);
                }
                start_or_join(dst);
                continue;
            }
            Known::Connection => {
                if lists(value, b"close") {
                    last = true;
                    add_close = false;
                }
                open = Some(known);
                start_or_join(dst);
                continue;
            }
            Known::Trailer => {
                if !chunkable {
                    continue;
                }
                open = Some(known);
                start_or_join(dst);
                if let Some(value) = visible_ascii(value) {
                    allowed.get_or_insert_with(Vec::new).extend(
                        value
                            .split(',')
                            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok()),
                    );
                }
                continue;
            }
            Known::Date => wrote_date = true,
            _ => {}
        }
        put_field(dst, name, value);
    }
    if let Some(open) = open {
        end_line(dst, open, must_chunk, &mut add_close);
    }
    if add_close {
        dst.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_length {
        encoder = match length {
            Some(None) if !chunkable => Encoder::Close,
            Some(None) => {
                dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Encoder::Chunked(None)
            }
            None | Some(Some(0)) => {
                if may_have_length(status) && *method != Method::HEAD {
                    dst.extend_from_slice(b"content-length: 0\r\n");
                }
                Encoder::Length(0)
            }
            Some(Some(_)) if !may_have_length(status) => Encoder::Length(0),
            Some(Some(known)) => {
                dst.extend_from_slice(b"content-length: ");
                put_decimal(dst, known);
                dst.extend_from_slice(b"\r\n");
                Encoder::Length(known)
            }
        };
    }
    if !has_body(method, status) {
        encoder = Encoder::Length(0);
    }
    if !wrote_date {
        dst.extend_from_slice(b"date: ");
        date(dst);
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    if let (Encoder::Chunked(none), Some(allowed)) = (&mut encoder, allowed) {
        *none = Some(allowed);
    }
    if encoder == Encoder::Close {
        last = true;
    }
    Ok((encoder, last))
}

/// Whether one Transfer-Encoding value ends with `chunked`.
fn lists_chunked_last(value: &[u8]) -> bool {
    let mut codings = Codings::default();
    codings.add(value);
    codings.chunked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(
        fields: Fields,
        method: Method,
        length: Option<Option<u64>>,
    ) -> Result<String, Invalid> {
        let mut head = ResponseHead {
            status: StatusCode::OK,
            version: Version::HTTP_11,
            reason: None,
            fields,
        };
        let mut out = Vec::new();
        encode_response_head(&mut out, &method, &mut head, length, true, |d| {
            d.extend_from_slice(b"D")
        })?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn raw(head: &[u8]) -> Fields {
        let mut buf = BytesMut::from(head);
        match parse_response(&mut buf, &Method::GET) {
            Ok(Answered::Complete(answer)) => answer.head.fields,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn repeated_equal_lengths_are_written_once() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\ncontent-length: 5\r\n\r\n";
        let expected = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\ndate: D\r\n\r\n";
        for length in [Some(Some(5)), Some(None)] {
            assert_eq!(
                encode(raw(head), Method::GET, length).as_deref(),
                Ok(expected)
            );
            let map = raw(head).into_map().expect("a map");
            assert_eq!(
                encode(Fields::Map(map), Method::GET, length).as_deref(),
                Ok(expected)
            );
        }
        // A HEAD's answer: the GET's length, once.
        assert_eq!(
            encode(raw(head), Method::HEAD, None).as_deref(),
            Ok(expected)
        );
        // Lengths that disagree frame nothing.
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        let mut buf = BytesMut::from(&head[..]);
        assert!(parse_response(&mut buf, &Method::GET).is_err());
    }
}
