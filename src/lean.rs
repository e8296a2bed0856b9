//! HTTP/1.1 without hyper's server for the common request: a head with no
//! body, no upgrade and no `Expect`. The connection's own task parses the
//! head, calls the service inline (no boxed future, no dispatcher) and
//! writes the answer's head and first piece of body in one write.
//!
//! Everything else goes to hyper, from that request on, with the bytes
//! already read: a request with a body, HTTP/1.0, an upgrade, HTTP/2 with
//! prior knowledge, a head too large or malformed (hyper then answers 400,
//! 414 or 431 as before). The framing and connection rules of the answers
//! follow hyper's server, so a client cannot tell the two paths apart.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    HOST, MAX_FORWARDS, SET_COOKIE, TE, TRAILER, TRANSFER_ENCODING,
};
use http::{HeaderMap, HeaderName, Method, Request, StatusCode, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;

use crate::proxy::direct::{MAX_HEADERS, RAW_HEAD_LIMIT, RawFields, Span, fields, record_spans};
use crate::proxy::headers::{
    Known, ends_chunked, length_digits, lists, put_name, takes_trailers, visible_ascii,
};
use crate::serve::{Bodiless, H2_PREFACE};

/// A head still incomplete at this size goes to hyper, which has the
/// limits and the answers (431) for large heads.
const MAX_LEAN_HEAD: usize = 64 * 1024;
/// The read buffer's size (hyper's first read size too).
const READ_SIZE: usize = 8192;
/// A piece of body at most this large is copied behind the head or the
/// chunk-size line, so that both leave in one write.
const COPY_LIMIT: usize = 16 * 1024;

/// How serving a connection ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The connection is done with: closed, broken, timed out or drained.
    Closed,
    /// Hyper serves the rest; these bytes were read and not used.
    Hyper(Bytes),
}

/// A request head, read and checked.
struct Head {
    /// Its map is empty when `fields` has them.
    request: Request<()>,
    fields: Option<RawFields>,
    keep_alive: bool,
    /// The client sent `TE: trailers`: trailers may be passed on.
    trailers: bool,
}

enum Parsed {
    Partial,
    Complete(Box<Head>),
    Hyper,
}

/// Serves requests on `io` until the connection ends or a request needs
/// hyper. Each wait for a request head is bounded by `header_timeout`, as
/// hyper's is; once `closing` fires, an idle connection is closed and a
/// busy one after its answer.
pub(crate) async fn serve<S, IO>(
    io: &mut IO,
    service: &S,
    header_timeout: Duration,
    closing: &CancellationToken,
) -> Ended
where
    S: Bodiless,
    S::Body: Body<Data = Bytes>,
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut first = true;
    let mut deadline = pin!(tokio::time::sleep(header_timeout));
    // Registered once for the connection's life, not at every wait.
    let mut drained = pin!(closing.cancelled());
    loop {
        // The deadline for this head: set when a read first finds nothing
        // to read, and kept until the head is whole, as hyper's: a client
        // cannot put it off by sending a byte at a time.
        let mut armed = false;
        // How much of `buf` has been searched for the end of the head:
        // httparse runs only once the end may have come, not over the
        // whole buffer at every read.
        let mut searched: usize = 0;
        let head = loop {
            let seen = buf.len().min(H2_PREFACE.len());
            if seen > 0 && buf[..seen] == H2_PREFACE[..seen] {
                if first {
                    return Ended::Hyper(buf.freeze());
                }
                // HTTP/2 cannot begin in the middle of an HTTP/1 connection.
                if seen >= 4 {
                    return Ended::Closed;
                }
            }
            let parsed = if may_end(buf.get(searched.saturating_sub(3)..).unwrap_or(&buf)) {
                parse(&mut buf)
            } else {
                Parsed::Partial
            };
            match parsed {
                Parsed::Complete(head) => break head,
                Parsed::Hyper => return Ended::Hyper(buf.freeze()),
                Parsed::Partial if buf.len() >= MAX_LEAN_HEAD => {
                    return Ended::Hyper(buf.freeze());
                }
                Parsed::Partial => searched = buf.len(),
            }
            make_room(&mut buf);
            // A client that stops mid-head gets no answer, as from hyper;
            // on shutdown, a connection waiting for a head is closed, as
            // hyper closes one that is idle or part-way through a head.
            let read = poll_fn(|cx| {
                if let Poll::Ready(read) = poll_read_buf(Pin::new(&mut *io), cx, &mut buf) {
                    return Poll::Ready(read.is_ok_and(|n| n > 0));
                }
                if !armed {
                    armed = true;
                    let at = tokio::time::Instant::now() + header_timeout;
                    deadline.as_mut().reset(at);
                }
                if deadline.as_mut().poll(cx).is_ready() || drained.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                Poll::Pending
            })
            .await;
            if !read {
                return Ended::Closed;
            }
        };
        first = false;
        let Head {
            request,
            fields,
            keep_alive,
            trailers,
        } = *head;
        let method = request.method().clone();

        // While the service works, a client that closes its connection
        // cancels the request (hyper does the same); bytes of a next
        // request wait in the buffer.
        let mut answer = pin!(service.call_bodiless(request, fields));
        let response = poll_fn(|cx| {
            if let Poll::Ready(response) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            if client_left(io, &mut buf, cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        let Some((response, raw)) = response else {
            return Ended::Closed;
        };

        let keep_alive = keep_alive && !closing.is_cancelled();
        let (mut parts, body) = response.into_parts();
        let length = if body.is_end_stream() {
            None
        } else {
            Some(body.size_hint().exact())
        };
        out.clear();
        let encoded = encode_head(
            &mut out,
            &method,
            &mut parts,
            raw.as_ref(),
            length,
            keep_alive,
        );
        drop(raw);
        let Ok((encoder, last)) = encoded else {
            return Ended::Closed;
        };
        let written = match encoder {
            Encoder::Length(0) => io.write_all(&out).await.map_err(drop),
            encoder => write_body(io, &mut out, &mut buf, body, encoder, trailers).await,
        };
        if written.is_err() || last {
            let _ = io.shutdown().await;
            return Ended::Closed;
        }
        if out.capacity() > 4 * COPY_LIMIT {
            // Not held while the connection waits.
            out = Vec::new();
        }
    }
}

/// The value of `future` if it is ready at once.
async fn poll_once<F: Future>(future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    poll_fn(|cx| {
        Poll::Ready(match future.as_mut().poll(cx) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        })
    })
    .await
}

/// Whether `bytes` hold the end of a head: an empty line (httparse takes
/// a bare LF as a line's end too).
fn may_end(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(at, byte)| {
        *byte == b'\n'
            && match bytes.get(at + 1) {
                Some(b'\n') => true,
                Some(b'\r') => bytes.get(at + 2) == Some(&b'\n'),
                _ => false,
            }
    })
}

/// Room in `buf` for a read.
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_SIZE / 2 {
        buf.reserve(READ_SIZE);
    }
}

/// While an answer is prepared or sent, whether the client has closed its
/// connection (hyper then cancels the request too). Reads only while `buf`
/// is empty: bytes of a next request wait there, and no more is read ahead.
fn client_left<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> bool {
    if !buf.is_empty() {
        return false;
    }
    make_room(buf);
    matches!(
        poll_read_buf(Pin::new(io), cx, buf),
        Poll::Ready(Ok(0) | Err(_))
    )
}

/// Parses a request head at the start of `buf`, and takes it off when it
/// is one this path serves.
fn parse(buf: &mut BytesMut) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let length = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // Malformed, or too many fields: hyper answers.
        Err(_) => return Parsed::Hyper,
    };
    if request.version != Some(1) {
        return Parsed::Hyper;
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Parsed::Hyper;
    };
    if !target.starts_with('/') || method == "CONNECT" {
        return Parsed::Hyper;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Hyper;
    };
    // Only a head without a body, and without anything that changes how
    // the connection goes on, is served here.
    let count = request.headers.len();
    let mut spans = [Span::default(); MAX_HEADERS];
    if record_spans(buf, length, request.headers, &mut spans).is_none() {
        return Parsed::Hyper;
    }
    let mut keep_alive = true;
    let mut connection_seen = false;
    let mut length_seen = false;
    for (span, field) in spans.iter().zip(request.headers.iter()) {
        match span.known {
            Known::TransferEncoding | Known::Expect | Known::Upgrade => return Parsed::Hyper,
            Known::ContentLength => {
                // hyper folds repeated lengths into one: it takes those.
                if field.value != b"0" || length_seen {
                    return Parsed::Hyper;
                }
                length_seen = true;
            }
            Known::Connection => {
                let value = field.value.trim_ascii();
                if connection_seen {
                    return Parsed::Hyper;
                }
                connection_seen = true;
                if value.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if !value.eq_ignore_ascii_case(b"keep-alive") {
                    return Parsed::Hyper;
                }
            }
            _ => {}
        }
    }
    let target = (target.as_ptr() as usize)
        .checked_sub(buf.as_ptr() as usize)
        .map(|start| start..start + target.len());
    let Some(target) = target.filter(|range| range.end <= length) else {
        return Parsed::Hyper;
    };
    let head = buf.split_to(length).freeze();
    let spans = &spans[..count];
    let raw = (head.len() <= RAW_HEAD_LIMIT).then(|| RawFields::new(head.clone(), spans));
    let headers = match raw {
        // The proxy reads and writes the fields as they came.
        Some(_) => Ok(HeaderMap::new()),
        // The proxy adds up to four: host, authorization, user-agent, te.
        None => fields(&head, spans, 4),
    };
    let (Ok(uri), Ok(headers)) = (http::Uri::from_maybe_shared(head.slice(target)), headers) else {
        // Put back for hyper, which answers (a URI too long, say). Rare:
        // httparse accepted what `http` refuses.
        let mut whole = BytesMut::with_capacity(head.len() + buf.len());
        whole.extend_from_slice(&head);
        whole.extend_from_slice(buf);
        *buf = whole;
        return Parsed::Hyper;
    };
    let trailers = match &raw {
        Some(raw) => takes_trailers(raw),
        None => takes_trailers(&headers),
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Parsed::Complete(Box::new(Head {
        request,
        fields: raw,
        keep_alive,
        trailers,
    }))
}

/// How the answer's body is framed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Encoder {
    /// So many bytes more.
    Length(u64),
    /// Chunked; trailers named in `Trailer` may follow.
    Chunked(Option<Vec<HeaderName>>),
    /// Until the connection closes.
    Close,
}

fn can_chunk(method: &Method, status: StatusCode) -> bool {
    method != Method::HEAD
        && !status.is_informational()
        && !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
}

fn can_have_length(status: StatusCode) -> bool {
    !status.is_informational()
        && !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
}

/// Writes the answer's head into `dst` as hyper's server does (lower-case
/// names, `date` added, the body's length or chunking declared), and says
/// how to frame the body and whether the connection ends after it. The
/// header fields are `raw`'s when there are (the upstream's, as they came),
/// else `head`'s. `length`: `None` for no body, else the exact size if
/// known.
fn encode_head(
    dst: &mut Vec<u8>,
    method: &Method,
    head: &mut http::response::Parts,
    raw: Option<&RawFields>,
    length: Option<Option<u64>>,
    keep_alive: bool,
) -> Result<(Encoder, bool), ()> {
    let status = head.status;
    let mut length = length;
    let mut raw = raw;
    let mut last = !keep_alive;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        last = true;
    } else if status.is_informational() {
        // hyper's server cannot send these either; nor can they arrive.
        head.headers.clear();
        head.extensions.clear();
        raw = None;
        head.status = StatusCode::INTERNAL_SERVER_ERROR;
        length = None;
        last = true;
    }
    let status = head.status;
    let reason = head.extensions.get::<hyper::ext::ReasonPhrase>();
    if status == StatusCode::OK && reason.is_none() && head.version != Version::HTTP_10 {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(if head.version == Version::HTTP_10 {
            b"HTTP/1.0 "
        } else {
            b"HTTP/1.1 "
        });
        dst.extend_from_slice(status.as_str().as_bytes());
        dst.push(b' ');
        match reason {
            Some(reason) => dst.extend_from_slice(reason.as_bytes()),
            None => dst.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        dst.extend_from_slice(b"\r\n");
    }
    let chunkable = can_chunk(method, status) && head.version != Version::HTTP_10;
    let mut encoder = Encoder::Length(0);
    let mut wrote_length = false;
    let mut wrote_date = false;
    let mut allowed: Option<Vec<HeaderName>> = None;
    // Closing, hyper's server adds `close` to the Connection field unless
    // it lists it: at the end of its values, or as a field of its own last.
    let mut add_close = !keep_alive;
    // A field whose values are joined on one line (length, encoding,
    // connection, trailer) is open while its values come.
    let mut open: Option<Known> = None;
    let mut must_chunk = false;
    let mut previous_length = None;
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
    let fields: &mut dyn Iterator<Item = (Known, &[u8], &[u8])> = match raw {
        Some(raw) => {
            from_raw = raw.grouped();
            &mut from_raw
        }
        None => {
            from_map = head.headers.iter().map(|(name, value)| {
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
        if known == Known::ContentLength {
            if wrote_length && !continued {
                return Err(());
            }
            match length {
                Some(Some(size)) => {
                    if !continued {
                        encoder = Encoder::Length(size);
                        start_or_join(dst);
                        wrote_length = true;
                        open = Some(known);
                    }
                    continue;
                }
                Some(None) => {
                    let parsed = length_digits(value).ok_or(())?;
                    match previous_length {
                        Some(previous) if previous != parsed => return Err(()),
                        Some(_) => {}
                        None => {
                            encoder = Encoder::Length(parsed);
                            start_or_join(dst);
                            wrote_length = true;
                            open = Some(known);
                            previous_length = Some(parsed);
                        }
                    }
                    continue;
                }
                None if *method != Method::HEAD => continue,
                None => wrote_length = true,
            }
        } else if known == Known::TransferEncoding {
            if wrote_length && !continued {
                return Err(());
            }
            if !chunkable {
                continue;
            }
            wrote_length = true;
            must_chunk = !ends_chunked(value);
            if !continued {
                encoder = Encoder::Chunked(None);
                open = Some(known);
            }
            start_or_join(dst);
            continue;
        } else if known == Known::Connection {
            if lists(value, b"close") {
                last = true;
                add_close = false;
            }
            open = Some(known);
            start_or_join(dst);
            continue;
        } else if known == Known::Trailer {
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
        } else if known == Known::Date {
            wrote_date = true;
        }
        put_name(dst, name);
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value);
        dst.extend_from_slice(b"\r\n");
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
                if can_have_length(status) && *method != Method::HEAD {
                    dst.extend_from_slice(b"content-length: 0\r\n");
                }
                Encoder::Length(0)
            }
            Some(Some(known)) if !can_have_length(status) => {
                let _ = known;
                Encoder::Length(0)
            }
            Some(Some(known)) => {
                let _ = write!(dst, "content-length: {known}\r\n");
                Encoder::Length(known)
            }
        };
    }
    if !can_chunk(method, status) {
        encoder = Encoder::Length(0);
    }
    if !wrote_date {
        dst.extend_from_slice(b"date: ");
        with_date(|date| dst.extend_from_slice(date));
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

/// Calls `f` with the current date as an HTTP date, formatted at most once
/// a second per thread.
fn with_date(f: impl FnOnce(&[u8])) {
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    DATE.with_borrow_mut(|(cached, date)| {
        if *cached != second {
            *cached = second;
            *date = httpdate::fmt_http_date(now);
        }
        f(date.as_bytes());
    });
}

/// Fields that may not be sent as trailers (hyper's list).
fn may_trail(name: &HeaderName) -> bool {
    ![
        AUTHORIZATION,
        CACHE_CONTROL,
        CONTENT_ENCODING,
        CONTENT_LENGTH,
        CONTENT_RANGE,
        CONTENT_TYPE,
        HOST,
        MAX_FORWARDS,
        SET_COOKIE,
        TRAILER,
        TRANSFER_ENCODING,
        TE,
    ]
    .contains(name)
}

/// Writes the head in `out` and the body after it, framed by `encoder`.
/// Small pieces are copied behind what is pending and leave with it; the
/// pending bytes are written whenever the body has nothing ready. `Err`:
/// the connection must close (write failed, body failed, body short).
async fn write_body<IO, B>(
    io: &mut IO,
    out: &mut Vec<u8>,
    buf: &mut BytesMut,
    body: B,
    mut encoder: Encoder,
    trailers: bool,
) -> Result<(), ()>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
{
    let mut body = pin!(body);
    loop {
        let frame = match poll_once(poll_fn(|cx| body.as_mut().poll_frame(cx))).await {
            Some(frame) => frame,
            None => {
                flush(io, out).await?;
                // As while the service worked: a client gone cancels.
                let frame = poll_fn(|cx| {
                    if let Poll::Ready(frame) = body.as_mut().poll_frame(cx) {
                        return Poll::Ready(Some(frame));
                    }
                    if client_left(io, buf, cx) {
                        return Poll::Ready(None);
                    }
                    Poll::Pending
                })
                .await;
                frame.ok_or(())?
            }
        };
        // The error says nothing more to the client than the cut does.
        match frame.map(|frame| frame.map_err(drop)) {
            None => break,
            Some(Err(())) => {
                // Cut the answer short where it broke: what came before is
                // sent, and the client sees the connection close.
                let _ = flush(io, out).await;
                return Err(());
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    if data.is_empty() {
                        continue;
                    }
                    match &mut encoder {
                        Encoder::Length(remaining) => {
                            let len = data.len() as u64;
                            if len > *remaining {
                                data.truncate(usize::try_from(*remaining).unwrap_or(usize::MAX));
                            }
                            *remaining = remaining.saturating_sub(len);
                            put(io, out, &data, &[]).await?;
                            if *remaining == 0 {
                                // All that was announced: the rest, if any,
                                // is not waited for (nor is it by hyper).
                                break;
                            }
                        }
                        Encoder::Chunked(_) => {
                            // Writing into a Vec cannot fail.
                            let _ = write!(out, "{:X}\r\n", data.len());
                            put(io, out, &data, b"\r\n").await?;
                        }
                        Encoder::Close => put(io, out, &data, &[]).await?,
                    }
                }
                Err(frame) => {
                    if let (Ok(fields), Encoder::Chunked(Some(allowed)), true) =
                        (frame.into_trailers(), &encoder, trailers)
                    {
                        let section = trailer_section(&fields, allowed);
                        if !section.is_empty() {
                            out.extend_from_slice(b"0\r\n");
                            out.extend_from_slice(&section);
                            out.extend_from_slice(b"\r\n");
                            return flush(io, out).await;
                        }
                    }
                }
            },
        }
    }
    match encoder {
        Encoder::Length(0) | Encoder::Close => {}
        Encoder::Length(_) => {
            // Shorter than announced: the client must not take it whole.
            let _ = flush(io, out).await;
            return Err(());
        }
        Encoder::Chunked(_) => out.extend_from_slice(b"0\r\n\r\n"),
    }
    flush(io, out).await
}

/// Writes what is pending in `out`, if anything, and empties it.
async fn flush<IO: AsyncWrite + Unpin>(io: &mut IO, out: &mut Vec<u8>) -> Result<(), ()> {
    if !out.is_empty() {
        io.write_all(out).await.map_err(drop)?;
        out.clear();
    }
    Ok(())
}

/// Queues `data` and `after` behind `out`; a large piece is written at
/// once, with what is pending, without being copied.
async fn put<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    out: &mut Vec<u8>,
    data: &Bytes,
    after: &[u8],
) -> Result<(), ()> {
    if data.len() <= COPY_LIMIT {
        out.extend_from_slice(data);
        out.extend_from_slice(after);
        // A body that keeps small pieces coming is written as it goes.
        if out.len() >= COPY_LIMIT {
            flush(io, out).await?;
        }
        return Ok(());
    }
    let mut pieces = [&out[..], &data[..], after];
    write_vectored_all(io, &mut pieces).await.map_err(drop)?;
    out.clear();
    Ok(())
}

/// Writes every byte of `pieces`, in as few writes as the socket allows.
async fn write_vectored_all<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    pieces: &mut [&[u8]],
) -> io::Result<()> {
    let mut at = 0;
    while at < pieces.len() {
        if pieces[at].is_empty() {
            at += 1;
            continue;
        }
        let slices: Vec<io::IoSlice<'_>> =
            pieces[at..].iter().map(|p| io::IoSlice::new(p)).collect();
        let mut written = io.write_vectored(&slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while at < pieces.len() && written >= pieces[at].len() {
            written -= pieces[at].len();
            at += 1;
        }
        if at < pieces.len() {
            pieces[at] = &pieces[at][written..];
        }
    }
    Ok(())
}

/// The trailer fields that may be passed on, as a trailer section.
fn trailer_section(fields: &HeaderMap, allowed: &[HeaderName]) -> Vec<u8> {
    let mut section = Vec::new();
    for (name, value) in fields {
        if allowed.contains(name) && may_trail(name) {
            section.extend_from_slice(name.as_str().as_bytes());
            section.extend_from_slice(b": ");
            section.extend_from_slice(value.as_bytes());
            section.extend_from_slice(b"\r\n");
        }
    }
    section
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Request heads mangled at random and delivered in pieces: each piece
    /// ends served, waited on, or handed to hyper, never in a panic; and
    /// what hyper is handed, or what waits for the next request, is always
    /// exactly the bytes not yet used, in order.
    #[test]
    fn mangled_heads_are_served_or_handed_over_whole() {
        let seeds: [&[u8]; 6] = [
            b"GET /a?b=1&b=2 HTTP/1.1\r\nHost: localhost:8080\r\nX-A: 1\r\n\r\n",
            b"HEAD /%2F HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
            b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\r\nGET / HTTP/1.1\nHost: x\nTE: trailers\n\nGET /2 HTTP/1.1\r\n\r\n",
        ];
        let mut rng = fastrand::Rng::with_seed(0x1ea7);
        let mut outcomes = [0usize; 3];
        for _ in 0..5000 {
            let bytes = crate::proxy::direct::mangled(&mut rng, &seeds);
            let piece = [1, 7, 4096][rng.usize(..3)];
            let mut buf = BytesMut::new();
            let (mut delivered, mut used) = (0, 0);
            'pieces: while delivered < bytes.len() {
                let next = (delivered + piece).min(bytes.len());
                buf.extend_from_slice(&bytes[delivered..next]);
                delivered = next;
                loop {
                    let before = buf.len();
                    match parse(&mut buf) {
                        Parsed::Partial => {
                            assert_eq!(buf[..], bytes[used..delivered]);
                            outcomes[0] += 1;
                            break;
                        }
                        Parsed::Complete(head) => {
                            used += before - buf.len();
                            assert_eq!(buf[..], bytes[used..delivered]);
                            assert!(head.request.uri().path().starts_with('/'));
                            outcomes[1] += 1;
                        }
                        Parsed::Hyper => {
                            assert_eq!(buf[..], bytes[used..delivered], "{bytes:?}");
                            outcomes[2] += 1;
                            break 'pieces;
                        }
                    }
                }
            }
        }
        // Each outcome came up often enough to have been tested.
        assert!(outcomes.iter().all(|n| *n > 500), "{outcomes:?}");
    }

    /// A request's fields as they arrived go through the guard, the
    /// cleaning and the proxy's additions to the same bytes on the wire as
    /// its header map does: for heads written by hand and thousands
    /// mangled.
    #[test]
    fn raw_request_fields_are_guarded_and_sent_as_a_map() {
        use crate::config::GuardConfig;
        use crate::guard::Guard;
        use crate::proxy::direct::{Added, Outgoing, RawRequest, encode_head};
        use crate::proxy::headers::{clean_request, clean_request_fields};
        use http::HeaderValue;

        let seeds: [&[u8]; 5] = [
            b"GET /a?b=1 HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8\r\nAccept: */*\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Proxy-Key: k3y-0123456789abcdef\r\nauthorization: Basic abc\r\nHOST: 127.0.0.1:8080\r\nTE: trailers, gzip\r\nTrailer: x\r\nAUTHORIZATION: Bearer other\r\n\r\n",
            b"HEAD /x HTTP/1.1\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\nProxy-Authorization: p\r\nhost: [::1]:8080\r\nUSER-AGENT: a\r\nuser-agent: b\r\nCookie: c=1\r\n\r\n",
            b"DELETE /y HTTP/1.1\r\nHost: evil.example\r\nOrigin: http://localhost:3000\r\nSec-Fetch-Site: cross-site\r\nContent-Length: 0\r\n\r\n",
            b"OPTIONS /z HTTP/1.1\r\nHost: localhost:8080\r\nHost: other\r\nOrigin: https://app.example\r\nConnection: close\r\nX-B: 1\r\nProxy-Connection: x\r\nX-B: 2\r\n\r\n",
        ];
        let listen = "127.0.0.1:8080".parse().ok();
        let guards = [
            Guard::new(&GuardConfig::default(), listen),
            Guard::new(
                &GuardConfig {
                    allowed_hosts: vec!["evil.example".into()],
                    allowed_origins: vec!["https://app.example".into()],
                    local_key: Some(crate::secret::LocalKey::new("k3y-0123456789abcdef")),
                },
                listen,
            ),
        ];
        let added = |trailers| Added {
            trailers,
            host: HeaderValue::from_static("api.example.com"),
            authorization: HeaderValue::from_static("Bearer token-1"),
            user_agent: HeaderValue::from_static("bearer-proxy/test"),
        };
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let (mut compared, mut refused) = (0, 0);
        for case in 0..20_000 {
            let bytes = if case < seeds.len() {
                seeds[case].to_vec()
            } else {
                crate::proxy::direct::mangled(&mut rng, &seeds)
            };
            let Parsed::Complete(head) = parse(&mut BytesMut::from(&bytes[..])) else {
                continue;
            };
            let Head {
                mut request,
                fields: Some(mut raw),
                trailers,
                ..
            } = *head
            else {
                panic!("a small head came without its fields");
            };
            // What `http` makes of the bytes that httparse accepted.
            let mut map = match raw.to_map(4) {
                Ok(map) => map,
                Err(message) => panic!("{message}: {}", String::from_utf8_lossy(&bytes)),
            };
            assert_eq!(trailers, takes_trailers(&map));
            for guard in &guards {
                let by_fields = guard.check_fields(&request, &raw).err().map(|e| e.code);
                *request.headers_mut() = map.clone();
                let by_map = guard.check(&request).err().map(|e| e.code);
                *request.headers_mut() = HeaderMap::new();
                assert_eq!(by_fields, by_map, "{}", String::from_utf8_lossy(&bytes));
                refused += usize::from(by_map.is_some());
            }
            clean_request(&mut map);
            added(trailers).apply(&mut map);
            clean_request_fields(&mut raw);
            let raw = RawRequest {
                fields: raw,
                added: added(trailers),
            };
            let target = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
            let (mut by_map, mut by_fields) = (BytesMut::new(), BytesMut::new());
            encode_head(&mut by_map, request.method(), target, Outgoing::Map(&map));
            encode_head(
                &mut by_fields,
                request.method(),
                target,
                Outgoing::Raw(&raw),
            );
            assert_eq!(
                String::from_utf8_lossy(&by_fields),
                String::from_utf8_lossy(&by_map),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
            assert_eq!(raw.to_map().ok(), Some(map));
            compared += 1;
        }
        // Enough heads were whole, and enough of them refused, to count.
        assert!(compared > 3_000 && refused > 1_000, "{compared} {refused}");
    }
}
