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
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{Method, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;

use super::service::Bodiless;
use crate::http1::{
    self, Encoder, Fields, H2_PREFACE, MAX_HEADERS, Parse, RAW_HEAD_LIMIT, RawFields, RequestHead,
    Span, takes_trailers,
};

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
pub(crate) struct Head {
    pub(crate) request: RequestHead,
    keep_alive: bool,
    /// The client sent `TE: trailers`: trailers may be passed on.
    pub(crate) trailers: bool,
}

pub(crate) enum Parsed {
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
            keep_alive,
            trailers,
        } = *head;
        let method = request.method.clone();

        // While the service works, a client that closes its connection
        // cancels the request (hyper does the same); bytes of a next
        // request wait in the buffer.
        let mut answer = pin!(service.call_bodiless(request));
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
        let Some((mut head, body)) = response else {
            return Ended::Closed;
        };

        let keep_alive = keep_alive && !closing.is_cancelled();
        let length = if body.is_end_stream() {
            None
        } else {
            Some(body.size_hint().exact())
        };
        out.clear();
        let encoded = http1::encode_response_head(
            &mut out, &method, &mut head, length, keep_alive, with_date,
        );
        drop(head);
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
pub(crate) fn parse(buf: &mut BytesMut) -> Parsed {
    let mut spans = [Span::default(); MAX_HEADERS];
    let line = match http1::parse_request(buf, &mut spans) {
        Ok(Parse::Complete(line)) => line,
        Ok(Parse::Partial) => return Parsed::Partial,
        // Malformed, or too many fields: hyper answers.
        Err(_) => return Parsed::Hyper,
    };
    let target = buf.get(line.target.clone()).unwrap_or_default();
    if line.version != 1 || !target.starts_with(b"/") || line.method == Method::CONNECT {
        return Parsed::Hyper;
    }
    // Only a head without a body, and without anything that changes how
    // the connection goes on, is served here: an h2c offer does not (it is
    // ignored), another upgrade does. Hyper's server keeps one of repeated
    // Content-Lengths and refuses a list: it has those.
    let signals = &line.signals;
    if signals.codings.present
        || signals.expect
        || signals.upgrade_other
        || signals.lookalike
        || signals.content_lengths > 1
        || signals.length_list
        || !matches!(signals.length, Ok(None | Some(0)))
    {
        return Parsed::Hyper;
    }
    let keep_alive = !signals.close;
    let head = buf.split_to(line.length).freeze();
    let spans = &spans[..line.count];
    let fields = if head.len() <= RAW_HEAD_LIMIT {
        // The proxy reads and writes the fields as they came.
        Ok(Fields::Raw(RawFields::new(head.clone(), spans)))
    } else {
        // The proxy adds up to four: host, authorization, user-agent, te.
        http1::raw::fields(&head, spans, 4).map(Fields::Map)
    };
    let (Ok(uri), Ok(fields)) = (
        http::Uri::from_maybe_shared(head.slice(line.target)),
        fields,
    ) else {
        // Put back for hyper, which answers (a URI too long, say). Rare:
        // httparse accepted what `http` refuses.
        let mut whole = BytesMut::with_capacity(head.len() + buf.len());
        whole.extend_from_slice(&head);
        whole.extend_from_slice(buf);
        *buf = whole;
        return Parsed::Hyper;
    };
    let trailers = takes_trailers(&fields);
    Parsed::Complete(Box::new(Head {
        request: RequestHead {
            method: line.method,
            uri,
            version: Version::HTTP_11,
            fields,
        },
        keep_alive,
        trailers,
    }))
}

/// Writes the current date as an HTTP date, formatted at most once a
/// second per thread.
fn with_date(dst: &mut Vec<u8>) {
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
        dst.extend_from_slice(date.as_bytes());
    });
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
                            http1::chunk_line(out, data.len());
                            put(io, out, &data, b"\r\n").await?;
                        }
                        Encoder::Close => put(io, out, &data, &[]).await?,
                    }
                }
                Err(frame) => {
                    if let (Ok(fields), Encoder::Chunked(Some(allowed)), true) =
                        (frame.into_trailers(), &encoder, trailers)
                    {
                        // The last frame: the body ends with them.
                        http1::end_chunked(out, Some((&fields, allowed)));
                        return flush(io, out).await;
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
        Encoder::Chunked(_) => http1::end_chunked(out, None),
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
            let bytes = crate::http1::testing::mangled(&mut rng, &seeds);
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
                            assert!(head.request.uri.path().starts_with('/'));
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
}
