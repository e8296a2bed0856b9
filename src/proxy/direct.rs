//! HTTP/1.1 to the upstream without a connection task, for requests that
//! have no body (most API calls). The request's own task writes the head
//! and reads the answer's head; the client's connection then reads the
//! answer's body straight from the upstream socket as it passes it on. No
//! channel, no second task, no wake-up between them.
//!
//! Requests with a body go through hyper's client instead, which sends the
//! body while it waits for an answer that may come first.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::headers::{Known, ends_chunked, length_digits, lists, put_name};

/// The largest answer head (hyper's default buffer limit).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// The longest chunk-size line (extensions included).
const MAX_CHUNK_LINE: usize = 4096;
/// The most bytes of chunk extensions in one body, and the largest trailer
/// section (hyper's limits too).
const MAX_EXTENSIONS: usize = 16 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;
/// The first read asks for this much; the size doubles while reads fill
/// it, up to `MAX_READ`, so large bodies move in large pieces.
const MIN_READ: usize = 8192;
const MAX_READ: usize = 256 * 1024;

/// Idle connections, the most recently used last.
pub(crate) type Idle<T> = Mutex<Vec<(Box<Conn<T>>, Instant)>>;

/// One HTTP/1.1 connection to the upstream and what has been read from it
/// but not yet used. Always boxed: a TLS connection's state is large, and
/// a connection moves from the pool to a request to a response body.
#[derive(Debug)]
pub(crate) struct Conn<T> {
    io: T,
    buf: BytesMut,
    read_size: usize,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Writing the request head failed.
    #[error("sending the request failed: {0}")]
    Write(#[source] io::Error),
    /// Reading the answer's head failed, or the connection closed first.
    #[error("reading the response failed: {source}")]
    Read {
        /// Whether any byte of an answer had arrived.
        received: bool,
        #[source]
        source: io::Error,
    },
    /// The answer is not HTTP/1.1 that can be passed on.
    #[error("it sent an invalid response: {0}")]
    Invalid(String),
}

impl ExchangeError {
    /// Whether the request may be sent again on a new connection after a
    /// reused one failed: when writing failed (the head did not all reach
    /// the upstream), and when the connection closed without a byte of
    /// answer if the method is safe (RFC 9110, 9.2.1): the upstream may
    /// have acted on it, and only a safe request can be repeated without
    /// a second effect. (RFC 9110 would allow PUT and DELETE too; a
    /// second DELETE answering 404 would hide the first one's success.)
    pub fn may_retry(&self, method: &Method) -> bool {
        match self {
            Self::Write(_) => true,
            Self::Read { received, .. } => !received && method.is_safe(),
            Self::Invalid(_) => false,
        }
    }
}

/// Where a header field's name and value lie in a head (start and end
/// offsets): recorded while httparse borrows the buffer, so that the values
/// can then be shared from the frozen head instead of copied.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Span {
    name: (u32, u32),
    value: (u32, u32),
    pub(crate) known: Known,
}

impl Span {
    /// The name's bytes in `head`, the one it was recorded in.
    fn name_in(self, head: &[u8]) -> Option<&[u8]> {
        head.get(self.name.0 as usize..self.name.1 as usize)
    }

    /// The value's bytes in `head`.
    fn value_in(self, head: &[u8]) -> Option<&[u8]> {
        head.get(self.value.0 as usize..self.value.1 as usize)
    }
}

/// The most header fields a head may have (hyper's limit too).
pub(crate) const MAX_HEADERS: usize = 100;

/// Records where each of `parsed` (httparse's fields of the head that
/// fills `buf[..length]`) lies; `None` if one lies outside it. httparse
/// gives slices of the buffer, but an empty one may point anywhere.
pub(crate) fn record_spans(
    buf: &[u8],
    length: usize,
    parsed: &[httparse::Header<'_>],
    spans: &mut [Span],
) -> Option<()> {
    let base = buf.as_ptr() as usize;
    let span = |part: &[u8]| {
        if part.is_empty() {
            return Some((0, 0));
        }
        let start = (part.as_ptr() as usize).checked_sub(base)?;
        let end = start.checked_add(part.len())?;
        // Heads are far shorter than 4 GiB, so these fit.
        (end <= length).then_some((u32::try_from(start).ok()?, u32::try_from(end).ok()?))
    };
    for (slot, field) in spans.iter_mut().zip(parsed) {
        *slot = Span {
            name: span(field.name.as_bytes())?,
            value: span(field.value)?,
            known: Known::of(field.name.as_bytes()),
        };
    }
    Some(())
}

/// The header fields at `spans` in `head`, values shared from it, in a
/// map with room for `more` (growing a map costs more than parsing).
pub(crate) fn fields(head: &Bytes, spans: &[Span], more: usize) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(spans.len() + more);
    for span in spans {
        let name = span
            .name_in(head)
            .and_then(|name| HeaderName::from_bytes(name).ok())
            .ok_or("a header name is not valid")?;
        let value = span
            .value_in(head)
            .and_then(|value| HeaderValue::from_maybe_shared(head.slice_ref(value)).ok())
            .ok_or_else(|| format!("the value of {name} is not valid"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

// Which fields to remove can be marked in a `u128`.
const _: () = assert!(MAX_HEADERS <= 128);

/// The largest head whose fields are passed on as they came: grouping
/// them by name then compares at most a few hundred KiB of names.
pub(crate) const RAW_HEAD_LIMIT: usize = 8 * 1024;

/// A message's header fields as they arrived, in order, shared from its
/// head: no header map is built for an answer that the lean server writes
/// out again, field for field, nor for a request that it reads and that
/// the proxy sends on.
#[derive(Debug)]
pub struct RawFields {
    head: Bytes,
    /// At most `MAX_HEADERS`.
    spans: Vec<Span>,
}

impl RawFields {
    /// The fields at `spans` (at most `MAX_HEADERS`) in `head`.
    pub(crate) fn new(head: Bytes, spans: &[Span]) -> Self {
        Self {
            head,
            spans: spans.to_vec(),
        }
    }

    fn name(&self, span: Span) -> &[u8] {
        span.name_in(&self.head).unwrap_or_default()
    }

    fn value(&self, span: Span) -> &[u8] {
        span.value_in(&self.head).unwrap_or_default()
    }

    fn field(&self, span: &Span) -> (Known, &[u8], &[u8]) {
        (span.known, self.name(*span), self.value(*span))
    }

    /// Names (as they came) and values, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Known, &[u8], &[u8])> {
        self.spans.iter().map(|span| self.field(span))
    }

    /// The values of the fields of a `known` name, in order.
    pub(crate) fn values(&self, known: Known) -> impl Iterator<Item = &[u8]> {
        self.spans
            .iter()
            .filter(move |span| span.known == known)
            .map(|span| self.value(*span))
    }

    /// Removes the fields whose positions are set in `marked`, keeping the
    /// order of the rest.
    pub(crate) fn remove_marked(&mut self, marked: u128) {
        let mut at = 0;
        self.spans.retain(|_| {
            let keep = marked >> at & 1 == 0;
            at += 1;
            keep
        });
    }

    /// The positions of the fields for which `test` holds.
    pub(crate) fn mark(&self, mut test: impl FnMut(Known, &[u8], &[u8]) -> bool) -> u128 {
        self.iter()
            .enumerate()
            .filter(|(_, (known, name, value))| test(*known, name, value))
            .fold(0, |marked, (at, _)| marked | 1 << at)
    }

    /// In a header map's order, which is the order hyper's server writes:
    /// the fields of one name together, names in the order they first came.
    pub(crate) fn grouped(&self) -> Grouped<'_> {
        Grouped {
            fields: self,
            group: 0,
            next: 0,
        }
    }

    /// Whether the head is small enough for [`grouped`](Self::grouped),
    /// whose name comparisons grow with the square of the fields: nearly
    /// every answer's is. A larger one is read into a header map.
    pub(crate) fn is_small(&self) -> bool {
        self.head.len() <= RAW_HEAD_LIMIT
    }

    /// The fields in a header map, with room for `more`.
    pub(crate) fn to_map(&self, more: usize) -> Result<HeaderMap, String> {
        fields(&self.head, &self.spans, more)
    }

    /// The fields in a header map.
    pub(crate) fn into_map(self) -> Result<HeaderMap, String> {
        self.to_map(0)
    }
}

/// What the proxy sets on every request that it sends: the upstream's
/// Host, the token, its own User-Agent, and `TE: trailers` when the client
/// can take trailers (TE itself is hop-by-hop, so the client's is gone).
#[derive(Debug, Clone)]
pub(crate) struct Added {
    pub(crate) trailers: bool,
    pub(crate) host: HeaderValue,
    pub(crate) authorization: HeaderValue,
    pub(crate) user_agent: HeaderValue,
}

impl Added {
    /// Sets them in a cleaned map: Host, Authorization and User-Agent
    /// take the place of the client's, and those that the client did not
    /// send (an h2c client sends no Host) come last, after TE.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        if self.trailers {
            headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
        headers.insert(http::header::HOST, self.host.clone());
        headers.insert(http::header::AUTHORIZATION, self.authorization.clone());
        headers.insert(http::header::USER_AGENT, self.user_agent.clone());
    }
}

/// A request's header fields as they arrived, cleaned, and what the proxy
/// sets: written out as the header map that [`to_map`](Self::to_map)
/// gives would be, without building it. Only for heads that
/// [`RawFields::is_small`] accepts.
#[derive(Debug)]
pub struct RawRequest {
    pub(crate) fields: RawFields,
    pub(crate) added: Added,
}

impl RawRequest {
    /// The same fields in a header map (for hyper's client).
    pub(crate) fn to_map(&self) -> Result<HeaderMap, String> {
        let mut headers = self.fields.to_map(4)?;
        self.added.apply(&mut headers);
        Ok(headers)
    }

    /// Each field as `name: value`, in the map's order: the client's
    /// grouped by name, the proxy's values in place of the client's, then
    /// those the client did not send, in the order `Added::apply` inserts
    /// them.
    fn for_each(&self, mut put: impl FnMut(&[u8], &[u8])) {
        let added = &self.added;
        let mut set = [false; 3];
        for (known, name, value) in self.fields.grouped() {
            let ours = match known {
                Known::Host => Some((0, &added.host)),
                Known::Authorization => Some((1, &added.authorization)),
                Known::UserAgent => Some((2, &added.user_agent)),
                _ => None,
            };
            match ours {
                // The client's first field of the name gives the place.
                Some((at, ours)) if !set[at] => {
                    set[at] = true;
                    put(name, ours.as_bytes());
                }
                Some(_) => {}
                None => put(name, value),
            }
        }
        if added.trailers {
            put(b"te", b"trailers");
        }
        let names: [&[u8]; 3] = [b"host", b"authorization", b"user-agent"];
        let values = [&added.host, &added.authorization, &added.user_agent];
        for ((set, name), value) in set.into_iter().zip(names).zip(values) {
            if !set {
                put(name, value.as_bytes());
            }
        }
    }
}

/// A request's header fields, to be written out.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outgoing<'a> {
    Map(&'a HeaderMap),
    Raw(&'a RawRequest),
}

/// See [`RawFields::grouped`].
#[derive(Debug)]
pub(crate) struct Grouped<'a> {
    fields: &'a RawFields,
    /// The first field of the group being written.
    group: usize,
    /// The next field to look at for it.
    next: usize,
}

impl<'a> Iterator for Grouped<'a> {
    type Item = (Known, &'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let fields = self.fields;
        let spans = fields.spans.as_slice();
        // Known names are told apart by their tag; other names by length
        // first, then by bytes.
        let same = |a: &Span, b: &Span| {
            a.known == b.known
                && (a.known != Known::Other
                    || (a.name.1 - a.name.0 == b.name.1 - b.name.0
                        && fields.name(*a).eq_ignore_ascii_case(fields.name(*b))))
        };
        loop {
            let leader = spans.get(self.group)?;
            while let Some(span) = spans.get(self.next) {
                let at = self.next;
                self.next += 1;
                if at == self.group || same(span, leader) {
                    return Some(fields.field(span));
                }
            }
            // The next group starts at the next name not seen before.
            self.group += 1;
            while let Some(candidate) = spans.get(self.group) {
                if !spans[..self.group]
                    .iter()
                    .any(|earlier| same(earlier, candidate))
                {
                    break;
                }
                self.group += 1;
            }
            self.next = self.group;
        }
    }
}

fn invalid(message: impl Into<String>) -> ExchangeError {
    ExchangeError::Invalid(message.into())
}

/// How the answer's body is delimited (RFC 9112, 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// An answer's head, read; its body still on the connection.
#[derive(Debug)]
pub(crate) struct Head {
    /// Without header fields: those are in `fields`.
    parts: http::response::Parts,
    fields: RawFields,
    framing: Framing,
    keep_alive: bool,
}

enum Parsed {
    Complete(Head),
    /// A 1xx answer, consumed: the real one follows.
    Informational,
    Partial,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    pub(crate) fn new(io: T) -> Box<Self> {
        Box::new(Self {
            io,
            buf: BytesMut::new(),
            read_size: MIN_READ,
        })
    }

    /// Whether an idle connection can carry a request: the upstream has
    /// neither closed it nor sent anything unasked. Never waits.
    pub(crate) fn is_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        self.buf.is_empty()
            && Pin::new(&mut self.io)
                .poll_read(&mut cx, &mut probe)
                .is_pending()
    }

    /// Writes a request that has no body and reads the answer's head
    /// (1xx answers are skipped, as hyper's client does).
    pub(crate) async fn exchange(
        &mut self,
        method: &Method,
        target: &str,
        headers: Outgoing<'_>,
    ) -> Result<Head, ExchangeError> {
        self.buf.clear();
        encode_head(&mut self.buf, method, target, headers);
        let written = self.io.write_all(&self.buf).await;
        self.buf.clear();
        written.map_err(ExchangeError::Write)?;
        self.io.flush().await.map_err(ExchangeError::Write)?;
        let mut received = false;
        loop {
            if !self.buf.is_empty() {
                match self.parse_head(method)? {
                    Parsed::Complete(head) => return Ok(head),
                    Parsed::Informational => continue,
                    Parsed::Partial => {}
                }
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(invalid(format!(
                    "its response head is larger than {MAX_HEAD} bytes"
                )));
            }
            self.buf.reserve(self.read_size);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) => {
                    return Err(ExchangeError::Read {
                        received,
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the connection closed before a complete response head",
                        ),
                    });
                }
                Ok(_) => received = true,
                Err(source) => return Err(ExchangeError::Read { received, source }),
            }
        }
    }

    fn parse_head(&mut self, method: &Method) -> Result<Parsed, ExchangeError> {
        // Uninitialised slots: initialising a hundred of them cost more
        // than parsing a typical head.
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            &self.buf,
            &mut slots,
        );
        let length = match parsed {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Err(error) => return Err(invalid(format!("its response head is malformed: {error}"))),
        };
        let code = response.code.unwrap_or_default();
        let status = StatusCode::from_u16(code)
            .map_err(|_| invalid(format!("its status code {code} is not valid")))?;
        if status.is_informational() && code != 101 {
            self.buf.advance(length);
            return Ok(Parsed::Informational);
        }
        let version = if response.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let mut spans = [Span::default(); MAX_HEADERS];
        let count = response.headers.len();
        record_spans(&self.buf, length, response.headers, &mut spans)
            .ok_or_else(|| invalid("a header field could not be read"))?;
        let signals = signals(&self.buf, &spans[..count]);
        let framing = framing(method, code, version, &signals)?;
        // Copied, as hyper does: rare, and httparse may give an empty or
        // non-ASCII reason from outside the buffer.
        let reason = response
            .reason
            .filter(|reason| !reason.is_empty() && Some(*reason) != status.canonical_reason())
            .map(|reason| Bytes::copy_from_slice(reason.as_bytes()));

        // What a header map takes (httparse has checked the bytes).
        if response
            .headers
            .iter()
            .any(|field| field.name.len() > usize::from(u16::MAX))
        {
            return Err(invalid("a header name is not valid"));
        }
        // As hyper's client, the fields are passed on as they came, even a
        // Content-Length beside Transfer-Encoding (which the proxy removes).
        let fields = RawFields::new(self.buf.split_to(length).freeze(), &spans[..count]);
        let both = signals.transfer_encoding && signals.content_length;
        let keep_alive = framing != Framing::Close
            && code != 101
            && !both
            && !signals.close
            && (version == Version::HTTP_11 || signals.keep_alive);

        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = status;
        parts.version = version;
        if let Some(reason) = reason
            && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason)
        {
            parts.extensions.insert(reason);
        }
        Ok(Parsed::Complete(Head {
            parts,
            fields,
            framing,
            keep_alive,
        }))
    }

    /// Reads more into the buffer; 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(self.read_size);
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if read >= self.read_size && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(read))
    }
}

/// The request line and header fields, as hyper's client writes them
/// (names in lower case, in the map's order).
pub(crate) fn encode_head(
    out: &mut BytesMut,
    method: &Method,
    target: &str,
    headers: Outgoing<'_>,
) {
    let fields: usize = match headers {
        Outgoing::Map(headers) => headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum(),
        Outgoing::Raw(raw) => {
            let added = &raw.added;
            raw.fields.head.len()
                + added.host.len()
                + added.authorization.len()
                + added.user_agent.len()
                + 64
        }
    };
    out.reserve(method.as_str().len() + target.len() + 13 + fields);
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    match headers {
        Outgoing::Map(headers) => {
            for (name, value) in headers {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        Outgoing::Raw(raw) => raw.for_each(|name, value| {
            put_name(out, name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }),
    }
    out.extend_from_slice(b"\r\n");
}

/// RFC 9112, 6.3, as hyper's client applies it.
/// What the framing and the reuse of a connection depend on, read from
/// the raw header fields in one pass (not looked up in the map).
#[derive(Debug, Default)]
struct Signals {
    transfer_encoding: bool,
    /// The last Transfer-Encoding value ends with `chunked`.
    chunked: bool,
    content_length: bool,
    /// The Content-Length, once every value (and list item) agreed.
    length: Option<u64>,
    length_invalid: bool,
    close: bool,
    keep_alive: bool,
}

fn signals(head: &[u8], spans: &[Span]) -> Signals {
    let mut signals = Signals::default();
    for span in spans {
        let value = span.value_in(head).unwrap_or_default();
        match span.known {
            Known::TransferEncoding => {
                signals.transfer_encoding = true;
                signals.chunked = ends_chunked(value);
            }
            Known::ContentLength => {
                signals.content_length = true;
                for item in value.split(|b| *b == b',') {
                    match (length_digits(item.trim_ascii()), signals.length) {
                        (Some(parsed), None) => signals.length = Some(parsed),
                        (Some(parsed), Some(seen)) if parsed == seen => {}
                        _ => signals.length_invalid = true,
                    }
                }
            }
            Known::Connection => {
                signals.close |= lists(value, b"close");
                signals.keep_alive |= lists(value, b"keep-alive");
            }
            _ => {}
        }
    }
    signals
}

fn framing(
    method: &Method,
    code: u16,
    version: Version,
    signals: &Signals,
) -> Result<Framing, ExchangeError> {
    if *method == Method::HEAD || matches!(code, 101 | 204 | 304) {
        return Ok(Framing::Empty);
    }
    if signals.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(invalid("an HTTP/1.0 response has Transfer-Encoding"));
        }
        // Chunked only if it is the final coding.
        return Ok(if signals.chunked {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    if signals.length_invalid {
        return Err(invalid("its Content-Length is not valid"));
    }
    Ok(signals.length.map_or(Framing::Close, Framing::Length))
}

impl Head {
    /// The answer without its header fields, and those fields. Its body is
    /// read from `conn`, which goes back to `idle` once the body has been
    /// read to its end (if the upstream keeps it open and sent nothing
    /// more).
    pub(crate) fn into_response<T: AsyncRead + AsyncWrite + Unpin>(
        self,
        conn: Box<Conn<T>>,
        idle: &Arc<Idle<T>>,
    ) -> (http::Response<DirectBody<T>>, RawFields) {
        let state = match self.framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(length) => State::Length(length),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::Close => State::Close,
        };
        let mut body = DirectBody {
            conn: Some(conn),
            state,
            idle: self.keep_alive.then(|| Arc::clone(idle)),
            error: None,
            extensions: 0,
        };
        if body.state == State::Done {
            body.finish();
        }
        (http::Response::from_parts(self.parts, body), self.fields)
    }
}

/// An answer's body, read from the upstream connection as it is polled.
#[derive(Debug)]
pub struct DirectBody<T> {
    /// `None` once the body has ended or failed.
    conn: Option<Box<Conn<T>>>,
    state: State,
    /// Where the connection goes when the body ends; `None` if it is not
    /// to be kept.
    idle: Option<Arc<Idle<T>>>,
    /// A failure, reported on the poll after it was met (see `failed`).
    error: Option<io::Error>,
    /// Bytes of chunk extensions so far.
    extensions: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
    /// Broken off: the error is still to be reported.
    Failed,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the chunk's data still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section, after the last chunk; how many of its bytes
    /// have been searched for its end.
    Trailers(usize),
}

impl<T> DirectBody<T> {
    /// The body has been read whole: the connection goes back to the pool
    /// if it may be kept and nothing unasked followed the body.
    fn finish(&mut self) {
        self.state = State::Done;
        if let (Some(mut conn), Some(idle)) = (self.conn.take(), self.idle.take())
            && conn.buf.is_empty()
        {
            if conn.read_size > MIN_READ {
                // A large download's buffer (which `capacity` may not show:
                // it counts only what is left past the last split) is not
                // kept for an idle connection.
                conn.buf = BytesMut::new();
                conn.read_size = MIN_READ;
            }
            if let Ok(mut idle) = idle.lock() {
                idle.push((conn, Instant::now()));
            }
        }
    }

    fn fail(
        &mut self,
        cx: &Context<'_>,
        message: String,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.failed(cx, io::Error::new(io::ErrorKind::InvalidData, message))
    }

    /// The body breaks off. The error is reported on the next poll, not
    /// this one, so that the client's connection first sends what it has
    /// (the head, the bytes that came): the client then sees a response
    /// cut short rather than a connection closed without one.
    fn failed(
        &mut self,
        cx: &Context<'_>,
        error: io::Error,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.state = State::Failed;
        self.conn = None;
        self.error = Some(error);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> http_body::Body for DirectBody<T> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Some(error) = this.error.take() {
            this.state = State::Done;
            return Poll::Ready(Some(Err(error)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // The bytes a body or chunk still needs, taken from what has
            // been read: `None` when there is nothing buffered.
            let take = |conn: &mut Conn<T>, remaining: &mut u64| {
                let n = usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(conn.buf.len());
                *remaining -= n as u64;
                conn.buf.split_to(n).freeze()
            };
            match this.state {
                State::Done | State::Failed => return Poll::Ready(None),
                State::Length(mut remaining) | State::Chunked(Chunk::Data(mut remaining))
                    if !conn.buf.is_empty() =>
                {
                    let data = take(conn, &mut remaining);
                    match (this.state, remaining) {
                        (State::Length(_), 0) => this.finish(),
                        (State::Length(_), _) => this.state = State::Length(remaining),
                        (_, 0) => this.state = State::Chunked(Chunk::DataEnd),
                        _ => this.state = State::Chunked(Chunk::Data(remaining)),
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Close if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Chunked(Chunk::Size) if !conn.buf.is_empty() => {
                    let starts_with_digit = conn.buf[0].is_ascii_hexdigit();
                    match httparse::parse_chunk_size(&conn.buf) {
                        Ok(httparse::Status::Complete((used, size)))
                            if starts_with_digit && !conn.buf[..used - 2].contains(&b'\n') =>
                        {
                            // Extensions are ignored, within a budget.
                            this.extensions += used.saturating_sub(18);
                            if this.extensions > MAX_EXTENSIONS {
                                return this.fail(
                                    cx,
                                    format!("the upstream sent more than {MAX_EXTENSIONS} bytes of chunk extensions"),
                                );
                            }
                            conn.buf.advance(used);
                            this.state = State::Chunked(if size == 0 {
                                Chunk::Trailers(0)
                            } else {
                                Chunk::Data(size)
                            });
                            continue;
                        }
                        Ok(httparse::Status::Partial) if conn.buf.len() <= MAX_CHUNK_LINE => {}
                        _ => {
                            return this.fail(cx, "the upstream sent an invalid chunk size".into());
                        }
                    }
                }
                State::Chunked(Chunk::DataEnd) if conn.buf.len() >= 2 => {
                    if &conn.buf[..2] != b"\r\n" {
                        return this
                            .fail(cx, "the upstream sent a chunk longer than its size".into());
                    }
                    conn.buf.advance(2);
                    this.state = State::Chunked(Chunk::Size);
                    continue;
                }
                State::Chunked(Chunk::Trailers(_)) if conn.buf.starts_with(b"\r\n") => {
                    conn.buf.advance(2);
                    this.finish();
                    return Poll::Ready(None);
                }
                State::Chunked(Chunk::Trailers(searched)) => {
                    // Searched from where the last read ended, not from the start.
                    let from = searched.saturating_sub(3);
                    let end = conn.buf[from.min(conn.buf.len())..]
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|at| from + at);
                    if let Some(end) = end {
                        let section = conn.buf.split_to(end + 4);
                        return match trailers(&section) {
                            Ok(trailers) => {
                                this.finish();
                                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                            }
                            Err(message) => this.fail(cx, message),
                        };
                    }
                    if conn.buf.len() > MAX_TRAILERS {
                        return this.fail(
                            cx,
                            format!(
                                "the upstream's trailer section is larger than {MAX_TRAILERS} bytes"
                            ),
                        );
                    }
                    this.state = State::Chunked(Chunk::Trailers(conn.buf.len()));
                }
                _ => {}
            }
            // Nothing usable is buffered: read more.
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.state == State::Close => {
                    this.conn = None;
                    this.state = State::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    let message = match this.state {
                        State::Length(remaining) => format!(
                            "the upstream closed the connection with {remaining} bytes of the body unsent"
                        ),
                        _ => "the upstream closed the connection in the middle of a chunked body"
                            .to_owned(),
                    };
                    return this.failed(cx, io::Error::new(io::ErrorKind::UnexpectedEof, message));
                }
                Ok(_) => {}
                Err(error) => return this.failed(cx, error),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(remaining) => SizeHint::with_exact(remaining),
            _ => SizeHint::default(),
        }
    }
}

/// A trailer section (ending in an empty line) as header fields.
fn trailers(section: &[u8]) -> Result<HeaderMap, String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let invalid = || "the upstream sent an invalid trailer section".to_owned();
    match httparse::parse_headers(section, &mut slots) {
        Ok(httparse::Status::Complete((_, fields))) => {
            let mut map = HeaderMap::with_capacity(fields.len());
            for field in fields {
                let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| invalid())?;
                let value = HeaderValue::from_bytes(field.value).map_err(|_| invalid())?;
                map.append(name, value);
            }
            Ok(map)
        }
        _ => Err(invalid()),
    }
}

/// The header fields of `head` (a response's), as the direct path keeps
/// them; `None` if it is not a whole and valid head.
#[cfg(test)]
pub(crate) fn raw_fields(head: &[u8]) -> Option<RawFields> {
    let mut conn = Conn::new(tokio::io::empty());
    conn.buf.extend_from_slice(head);
    match conn.parse_head(&Method::GET) {
        Ok(Parsed::Complete(head)) => Some(head.fields),
        _ => None,
    }
}

/// One of `seeds` mangled at random for tests: bytes changed, inserted,
/// removed, cut, repeated.
#[cfg(test)]
pub(crate) fn mangled(rng: &mut fastrand::Rng, seeds: &[&[u8]]) -> Vec<u8> {
    let inserts = [b'\r', b'\n', b':', b' ', b';', b'0', b'f', b',', 0x7f, 0xff];
    let mut bytes = seeds[rng.usize(..seeds.len())].to_vec();
    for _ in 0..rng.usize(1..5) {
        let at = rng.usize(..bytes.len().max(1)).min(bytes.len());
        match rng.u8(..5) {
            0 if at < bytes.len() => bytes[at] = rng.u8(..),
            1 => bytes.insert(at, inserts[rng.usize(..inserts.len())]),
            2 if at < bytes.len() => {
                bytes.remove(at);
            }
            3 => bytes.truncate(at),
            _ => {
                let piece = bytes[at..].to_vec();
                bytes.extend_from_slice(&piece[..piece.len().min(16)]);
            }
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HOST;
    use http_body_util::BodyExt;
    use tokio::io::{DuplexStream, duplex};

    type Upstream = tokio::task::JoinHandle<(Vec<u8>, Option<DuplexStream>)>;

    /// Sends `method` on a new connection to an upstream that answers
    /// `reply` through a pipe of `pipe` bytes (1: every read gets one
    /// byte), then closes if `close`, else stays open.
    async fn send(
        method: Method,
        reply: &[u8],
        pipe: usize,
        close: bool,
    ) -> (
        Result<http::Response<DirectBody<DuplexStream>>, ExchangeError>,
        Arc<Idle<DuplexStream>>,
        Upstream,
    ) {
        let (ours, mut theirs) = duplex(pipe);
        let reply = reply.to_vec();
        let upstream = tokio::spawn(async move {
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                match theirs.read(&mut byte).await {
                    Ok(1) => request.push(byte[0]),
                    _ => return (request, None),
                }
            }
            let _ = theirs.write_all(&reply).await;
            (request, (!close).then_some(theirs))
        });
        let mut conn = Conn::new(ours);
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("upstream"));
        headers.append("x-many", HeaderValue::from_static("1"));
        headers.append("x-many", HeaderValue::from_static("2"));
        let idle = Arc::new(Idle::default());
        let response = match conn
            .exchange(&method, "/a?b=%2F", Outgoing::Map(&headers))
            .await
        {
            Ok(head) => {
                let (mut response, fields) = head.into_response(conn, &idle);
                *response.headers_mut() = fields.into_map().expect("valid fields");
                Ok(response)
            }
            Err(error) => Err(error),
        };
        (response, idle, upstream)
    }

    /// The body's data, and its trailers.
    async fn read(
        response: http::Response<DirectBody<DuplexStream>>,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), io::Error> {
        let collected = response.into_body().collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((collected.to_bytes().to_vec(), trailers))
    }

    fn pooled(idle: &Idle<DuplexStream>) -> usize {
        idle.lock().map(|idle| idle.len()).unwrap_or_default()
    }

    #[tokio::test]
    async fn the_request_head_is_written_as_hyper_writes_it() {
        let (response, _, upstream) = send(
            Method::DELETE,
            b"HTTP/1.1 204 No Content\r\n\r\n",
            4096,
            false,
        )
        .await;
        assert!(response.is_ok());
        let (request, _) = upstream.await.expect("upstream");
        assert_eq!(
            String::from_utf8_lossy(&request),
            "DELETE /a?b=%2F HTTP/1.1\r\nhost: upstream\r\nx-many: 1\r\nx-many: 2\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_sized_body_is_read_and_the_connection_kept() {
        for pipe in [1, 4096] {
            let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A: 1\r\n\r\nhello world";
            let (response, idle, _upstream) = send(Method::GET, reply, pipe, false).await;
            let response = response.expect("a response");
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["x-a"], "1");
            assert_eq!(response.headers()[http::header::CONTENT_LENGTH], "11");
            assert!(
                response
                    .extensions()
                    .get::<hyper::ext::ReasonPhrase>()
                    .is_none()
            );
            let (data, _) = read(response).await.expect("the body");
            assert_eq!(data, b"hello world");
            assert_eq!(pooled(&idle), 1, "pipe {pipe}");
        }
    }

    #[tokio::test]
    async fn a_chunked_body_is_decoded_with_extensions_and_trailers() {
        for pipe in [1, 3, 4096] {
            let reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                5;name=value\r\nhello\r\nA\r\n worldwide\r\n0\r\nx-sum: abc\r\n\r\n";
            let (response, idle, _upstream) = send(Method::GET, reply, pipe, false).await;
            let (data, trailers) = read(response.expect("a response")).await.expect("the body");
            assert_eq!(data, b"hello worldwide");
            assert_eq!(trailers.expect("trailers")["x-sum"], "abc");
            assert_eq!(pooled(&idle), 1, "pipe {pipe}");
        }
        let reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let (response, idle, _upstream) = send(Method::GET, reply, 1, false).await;
        let (data, trailers) = read(response.expect("a response")).await.expect("body");
        assert_eq!((data.as_slice(), trailers), (&b"abc"[..], None));
        assert_eq!(pooled(&idle), 1);
    }

    #[tokio::test]
    async fn informational_answers_are_skipped() {
        let reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
            HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nok";
        let (response, idle, _upstream) = send(Method::GET, reply, 1, false).await;
        let response = response.expect("a response");
        assert_eq!(response.status(), 200);
        assert!(!response.headers().contains_key("link"));
        let reason = response.extensions().get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Fine Thanks"[..]));
        assert_eq!(read(response).await.expect("body").0, b"ok");
        assert_eq!(pooled(&idle), 1);
    }

    #[tokio::test]
    async fn reason_phrases_empty_or_not_ascii_are_fine() {
        let replies: [(&[u8], Option<&[u8]>); 4] = [
            (b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", None),
            (b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok", None),
            (
                b"HTTP/1.1 200 D\xe9j\xe0 vu\r\nContent-Length: 2\r\n\r\nok",
                None,
            ),
            (
                b"HTTP/1.1 404 Gone Fishing\r\nContent-Length: 2\r\n\r\nok",
                Some(b"Gone Fishing"),
            ),
        ];
        for (reply, reason) in replies {
            let (response, idle, _upstream) = send(Method::GET, reply, 4096, false).await;
            let response = response.expect("a response");
            let got = response.extensions().get::<hyper::ext::ReasonPhrase>();
            if let Some(reason) = reason {
                assert_eq!(got.map(|r| r.as_bytes()), Some(reason));
            }
            assert_eq!(read(response).await.expect("body").0, b"ok");
            assert_eq!(pooled(&idle), 1);
        }
    }

    #[tokio::test]
    async fn transfer_encoding_overrides_content_length() {
        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        let (response, idle, _upstream) = send(Method::GET, reply, 4096, false).await;
        let response = response.expect("a response");
        assert_eq!(read(response).await.expect("body").0, b"ok");
        assert_eq!(
            pooled(&idle),
            0,
            "a message with both is not trusted further"
        );
    }

    #[tokio::test]
    async fn answers_without_a_body() {
        let cases: [(Method, &[u8]); 3] = [
            (
                Method::HEAD,
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
            ),
            (
                Method::GET,
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n",
            ),
            (Method::GET, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ];
        for (method, reply) in cases {
            let (response, idle, _upstream) = send(method, reply, 4096, false).await;
            let response = response.expect("a response");
            assert!(http_body::Body::is_end_stream(response.body()));
            assert_eq!(pooled(&idle), 1, "pooled at once");
            assert!(read(response).await.expect("body").0.is_empty());
        }
    }

    #[tokio::test]
    async fn a_body_to_the_close_is_read_whole_and_the_connection_not_kept() {
        let reply = b"HTTP/1.1 200 OK\r\n\r\nall of it";
        let (response, idle, _upstream) = send(Method::GET, reply, 1, true).await;
        assert_eq!(
            read(response.expect("a response")).await.expect("body").0,
            b"all of it"
        );
        assert_eq!(pooled(&idle), 0);
    }

    #[tokio::test]
    async fn connections_the_upstream_will_close_are_not_kept() {
        let replies: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            // Something unasked after the body.
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
        ];
        for reply in replies {
            let (response, idle, _upstream) = send(Method::GET, reply, 4096, false).await;
            assert_eq!(
                read(response.expect("a response")).await.expect("body").0,
                b"ok"
            );
            assert_eq!(pooled(&idle), 0, "{}", String::from_utf8_lossy(reply));
        }
        let reply = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok";
        let (response, idle, _upstream) = send(Method::GET, reply, 4096, false).await;
        assert_eq!(
            read(response.expect("a response")).await.expect("body").0,
            b"ok"
        );
        assert_eq!(pooled(&idle), 1, "HTTP/1.0 with keep-alive");
    }

    #[tokio::test]
    async fn invalid_heads_are_refused() {
        let replies: [&[u8]; 5] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"SMTP ready\r\n\r\n",
        ];
        for reply in replies {
            let (response, _, _upstream) = send(Method::GET, reply, 4096, false).await;
            assert!(
                matches!(response, Err(ExchangeError::Invalid(_))),
                "{}",
                String::from_utf8_lossy(reply)
            );
        }
        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok";
        let (response, _, _upstream) = send(Method::GET, reply, 4096, false).await;
        assert_eq!(
            read(response.expect("equal lengths"))
                .await
                .expect("body")
                .0,
            b"ok"
        );
    }

    #[tokio::test]
    async fn broken_bodies_end_in_an_error_and_the_connection_is_dropped() {
        let long_trailer = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nx-long: {}\r\n\r\n",
            "a".repeat(MAX_TRAILERS)
        );
        let replies: [&[u8]; 6] = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x\nzz\r\nok\r\n0\r\n\r\n",
            long_trailer.as_bytes(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        ];
        for reply in replies {
            let (response, idle, _upstream) = send(Method::GET, reply, 1, true).await;
            assert!(
                read(response.expect("a response")).await.is_err(),
                "{}",
                String::from_utf8_lossy(reply)
            );
            assert_eq!(pooled(&idle), 0);
        }
    }

    #[tokio::test]
    async fn a_connection_closed_without_an_answer_may_be_retried_if_safe() {
        let (response, _, _upstream) = send(Method::GET, b"", 4096, true).await;
        let error = response.expect_err("no answer");
        assert!(matches!(
            error,
            ExchangeError::Read {
                received: false,
                ..
            }
        ));
        assert!(error.may_retry(&Method::GET));
        assert!(error.may_retry(&Method::HEAD));
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            assert!(!error.may_retry(&method), "{method}");
        }

        let (response, _, _upstream) = send(Method::GET, b"HTTP/1.1 200", 4096, true).await;
        let error = response.expect_err("half an answer");
        assert!(matches!(error, ExchangeError::Read { received: true, .. }));
        assert!(!error.may_retry(&Method::GET));
    }

    /// Valid answers mangled at random (bytes changed, inserted, removed,
    /// cut, repeated), delivered in pieces of random size: each ends in a
    /// response or an error, never a panic or a hang.
    #[tokio::test]
    async fn mangled_answers_end_in_an_answer_or_an_error() {
        let seeds: [&[u8]; 5] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\nto the end",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\nETag: \"x\"\r\n\r\n",
        ];
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for _ in 0..3000 {
            let bytes = mangled(&mut rng, &seeds);
            let method = if rng.bool() {
                Method::GET
            } else {
                Method::HEAD
            };
            let pipe = [1, 7, 4096][rng.usize(..3)];
            let exchange = async {
                let (response, _, _upstream) = send(method, &bytes, pipe, true).await;
                if let Ok(response) = response {
                    let _ = read(response).await;
                }
            };
            let ended = tokio::time::timeout(std::time::Duration::from_secs(5), exchange).await;
            assert!(
                ended.is_ok(),
                "hung on {:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[tokio::test]
    async fn an_idle_connection_is_usable_until_the_upstream_closes_it() {
        let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (response, idle, upstream) = send(Method::GET, reply, 4096, false).await;
        read(response.expect("a response")).await.expect("body");
        let (mut conn, _) = idle.lock().expect("lock").pop().expect("pooled");
        assert!(conn.is_usable());
        let (_, theirs) = upstream.await.expect("upstream");
        drop(theirs);
        assert!(!conn.is_usable());
    }
}
