//! HTTP/1.1 to the upstream without a connection task. The request's own
//! task writes the head (and the body, while it watches for an answer
//! that may come first) and reads the answer's head; the client's
//! connection then reads the answer's body straight from the upstream
//! socket as it passes it on. No channel, no second task, no wake-up
//! between them. The bytes on the wire are `http1`'s; what is here is the
//! connection: its buffer, its reuse, and when a request may be sent again.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};

use std::future::poll_fn;

use bytes::{Buf, Bytes, BytesMut};
use http::Method;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::http1::{self, Answer, Answered, Decoded, Decoder, ResponseHead, WriteFields};

/// The largest answer head (hyper's default buffer limit).
const MAX_HEAD: usize = 8192 + 4096 * 100;
/// The first read asks for this much; the size doubles while reads fill
/// it, up to `MAX_READ`, so large bodies move in large pieces.
const MIN_READ: usize = 8192;
const MAX_READ: usize = 256 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle connections, the most recently used last.
pub type Idle<T> = Mutex<Vec<(Box<Conn<T>>, Instant)>>;

/// One HTTP/1.1 connection to the upstream and what has been read from it
/// but not yet used. Always boxed: a TLS connection's state is large, and
/// a connection moves from the pool to a request to a response body.
pub struct Conn<T> {
    io: T,
    buf: BytesMut,
    read_size: usize,
    /// Counts the connection open in the metrics until it is dropped.
    counted: Option<crate::metrics::Open>,
    /// Counts it busy with a request while it is out of the pool (until
    /// it is back, becomes a tunnel, or is dropped).
    in_use: Option<Tally>,
}

/// Counts one in a shared count while it lives: a connection busy with a
/// request, or one being opened.
#[derive(Debug)]
pub struct Tally(Arc<std::sync::atomic::AtomicUsize>);

impl Tally {
    pub fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How a request's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// By its Content-Length, which the fields carry.
    Length(u64),
    /// Chunked, announced after the fields.
    Chunked,
}

/// What of a request is still to be written: its head (or a chunk line),
/// a piece of body, and what follows that piece.
pub struct Sending {
    head: BytesMut,
    data: Bytes,
    after: &'static [u8],
    /// Bytes the Content-Length still announces; `None` when chunked.
    remaining: Option<u64>,
    /// The whole body is queued.
    done: bool,
}

impl std::fmt::Debug for Sending {
    // Not the bytes: the head carries the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sending")
            .field(
                "pending",
                &(self.head.len() + self.data.len() + self.after.len()),
            )
            .field("remaining", &self.remaining)
            .field("done", &self.done)
            .finish()
    }
}

/// What of a request is left when its answer's head has come.
#[derive(Debug)]
pub enum Rest {
    /// Nothing: it was sent whole.
    Sent,
    /// Its body is still being sent: the answer's body sends it on.
    Unsent(Sending),
    /// Sending failed: the connection cannot carry another request.
    Broken,
}

/// A request's body still being sent while its answer is read.
pub type UploadBody = Box<dyn http_body::Body<Data = Bytes, Error = BoxError> + Send + Unpin>;

/// The rest of a request: what is queued, and the body it comes from.
struct Upload {
    sending: Sending,
    body: UploadBody,
    /// The whole request has left.
    done: bool,
    /// Kept until then, or until the answer ends if that is later (the
    /// caller's capacity permit, say).
    kept: Option<Box<dyn std::any::Any + Send>>,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("sending", &self.sending)
            .finish()
    }
}

impl Sending {
    fn new(framing: BodyFraming) -> Self {
        Self {
            head: BytesMut::new(),
            data: Bytes::new(),
            after: b"",
            remaining: match framing {
                BodyFraming::Length(length) => Some(length),
                BodyFraming::Chunked => None,
            },
            done: false,
        }
    }

    /// Writes what is pending, takes the next piece of body when it is
    /// all out, and so on until the whole request has left (flushed).
    fn poll_send<T, B>(
        &mut self,
        mut io: Pin<&mut T>,
        mut body: Pin<&mut B>,
        cx: &mut Context<'_>,
        touched: &mut bool,
    ) -> Poll<Result<(), ExchangeError>>
    where
        T: AsyncWrite,
        B: http_body::Body<Data = Bytes> + ?Sized,
        B::Error: Into<BoxError>,
    {
        loop {
            if self.is_pending() {
                ready!(self.poll_write(io.as_mut(), cx)).map_err(ExchangeError::Write)?;
                continue;
            }
            if self.done {
                return io.as_mut().poll_flush(cx).map_err(ExchangeError::Write);
            }
            let frame = match body.as_mut().poll_frame(cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    // What was written leaves while the body waits.
                    ready!(io.as_mut().poll_flush(cx)).map_err(ExchangeError::Write)?;
                    return Poll::Pending;
                }
            };
            *touched = true;
            match frame {
                None => self.finish()?,
                Some(Err(error)) => return Poll::Ready(Err(ExchangeError::Body(error.into()))),
                Some(Ok(frame)) => {
                    // Trailers are not sent: the proxy removes the Trailer
                    // field that would announce them, as hyper's client
                    // drops them without it.
                    if let Ok(data) = frame.into_data() {
                        self.queue(data)?;
                    }
                }
            }
        }
    }

    fn is_pending(&self) -> bool {
        !self.head.is_empty() || !self.data.is_empty() || !self.after.is_empty()
    }

    /// Queues a piece of body, framed.
    fn queue(&mut self, data: Bytes) -> Result<(), ExchangeError> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.remaining {
            Some(remaining) => {
                let len = data.len() as u64;
                if len > *remaining {
                    return Err(ExchangeError::Body(
                        "the request body is longer than its Content-Length".into(),
                    ));
                }
                *remaining -= len;
            }
            None => {
                let mut line = Vec::with_capacity(10);
                http1::chunk_line(&mut line, data.len());
                self.head.extend_from_slice(&line);
                self.after = b"\r\n";
            }
        }
        self.data = data;
        Ok(())
    }

    /// The body has ended: its end is queued.
    fn finish(&mut self) -> Result<(), ExchangeError> {
        match self.remaining {
            Some(0) => {}
            Some(_) => {
                return Err(ExchangeError::Body(
                    "the request body is shorter than its Content-Length".into(),
                ));
            }
            None => {
                let mut end = Vec::with_capacity(5);
                http1::end_chunked(&mut end, None);
                self.head.extend_from_slice(&end);
            }
        }
        self.done = true;
        Ok(())
    }

    /// Writes what it can of what is pending, in one vectored write.
    fn poll_write<T: AsyncWrite>(
        &mut self,
        io: Pin<&mut T>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let slices = [
            io::IoSlice::new(&self.head),
            io::IoSlice::new(&self.data),
            io::IoSlice::new(self.after),
        ];
        let mut written = ready!(io.poll_write_vectored(cx, &slices))?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        let from_head = written.min(self.head.len());
        self.head.advance(from_head);
        written -= from_head;
        let from_data = written.min(self.data.len());
        self.data.advance(from_data);
        written -= from_data;
        self.after = &self.after[written.min(self.after.len())..];
        Poll::Ready(Ok(()))
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Writing the request (its head or its body) failed.
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
    /// The request's body could not be read, or did not match its framing.
    #[error("the request body failed: {0}")]
    Body(BoxError),
}

impl<T> std::fmt::Debug for Conn<T> {
    // Not the buffer: it held the request's head, token included.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl ExchangeError {
    /// Whether the request may be sent again on a new connection after a
    /// reused one failed: when writing failed (the request did not all
    /// reach the upstream; the caller checks that none of a body was
    /// taken), and when the connection closed without a byte of
    /// answer if the method is safe (RFC 9110, 9.2.1): the upstream may
    /// have acted on it, and only a safe request can be repeated without
    /// a second effect. (RFC 9110 would allow PUT and DELETE too; a
    /// second DELETE answering 404 would hide the first one's success.)
    pub fn may_retry(&self, method: &Method) -> bool {
        match self {
            Self::Write(_) => true,
            Self::Read { received, .. } => !received && method.is_safe(),
            Self::Invalid(_) | Self::Body(_) => false,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    pub fn new(io: T) -> Box<Self> {
        Box::new(Self {
            io,
            buf: BytesMut::new(),
            read_size: MIN_READ,
            counted: None,
            in_use: None,
        })
    }

    /// Counted busy in `count` until it is back in the pool.
    pub fn set_in_use(&mut self, count: &Arc<std::sync::atomic::AtomicUsize>) {
        self.in_use = Some(Tally::new(count));
    }

    /// Counted open in the metrics until dropped (or handed over whole).
    pub fn counted(mut self: Box<Self>, open: Option<crate::metrics::Open>) -> Box<Self> {
        self.counted = open;
        self
    }

    /// The connection and what was read from it but not used.
    pub fn into_parts(self) -> (T, Bytes) {
        (self.io, self.buf.freeze())
    }

    /// The guard that counts the connection open, taken out to go with
    /// the connection wherever it goes next (a tunnel).
    pub fn take_counted(&mut self) -> Option<crate::metrics::Open> {
        // A tunnel never comes back to the pool.
        self.in_use = None;
        self.counted.take()
    }

    /// Whether an idle connection can carry a request: the upstream has
    /// neither closed it nor sent anything unasked. Never waits.
    pub fn is_usable(&mut self) -> bool {
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
    pub async fn exchange(
        &mut self,
        method: &Method,
        target: &str,
        fields: &impl WriteFields,
    ) -> Result<Answer, ExchangeError> {
        self.buf.clear();
        http1::encode_request_head(&mut self.buf, method, target, fields, false);
        let written = self.io.write_all(&self.buf).await;
        self.buf.clear();
        written.map_err(ExchangeError::Write)?;
        self.io.flush().await.map_err(ExchangeError::Write)?;
        let mut received = false;
        poll_fn(|cx| self.poll_answer(cx, method, &mut received)).await
    }

    /// Writes a request and its body, framed so, and reads the answer's
    /// head. The answer is read while the body is sent: an upstream may
    /// answer before it has the whole body. `touched` says whether any of
    /// the body was taken (a request whose body was not may be sent
    /// again). Returns the answer and what of the request is still to be
    /// sent: the answer's body carries on with it (see [`Rest`]).
    pub async fn exchange_with_body<B>(
        &mut self,
        method: &Method,
        target: &str,
        fields: &impl WriteFields,
        framing: BodyFraming,
        body: &mut B,
        touched: &mut bool,
    ) -> Result<(Answer, Rest), ExchangeError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        self.buf.clear();
        let mut sending = Sending::new(framing);
        let chunked = framing == BodyFraming::Chunked;
        http1::encode_request_head(&mut sending.head, method, target, fields, chunked);
        let mut received = false;
        let mut sent = false;
        poll_fn(|cx| {
            // The answer first: it may come before the whole body.
            if let Poll::Ready(answer) = self.poll_answer(cx, method, &mut received) {
                let rest = if sent {
                    Rest::Sent
                } else {
                    Rest::Unsent(std::mem::replace(&mut sending, Sending::new(framing)))
                };
                return Poll::Ready(answer.map(|answer| (answer, rest)));
            }
            if sent {
                return Poll::Pending;
            }
            match sending.poll_send(Pin::new(&mut self.io), Pin::new(&mut *body), cx, touched) {
                Poll::Ready(Ok(())) => {
                    sent = true;
                    Poll::Pending
                }
                Poll::Ready(Err(ExchangeError::Write(error))) => {
                    // An upstream that refuses the body may answer, then
                    // close: its answer, if it came, is what counts.
                    match self.poll_answer(cx, method, &mut received) {
                        Poll::Ready(Ok(answer)) => Poll::Ready(Ok((answer, Rest::Broken))),
                        _ => Poll::Ready(Err(ExchangeError::Write(error))),
                    }
                }
                Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Reads until the answer's head is whole (1xx answers are skipped).
    fn poll_answer(
        &mut self,
        cx: &mut Context<'_>,
        method: &Method,
        received: &mut bool,
    ) -> Poll<Result<Answer, ExchangeError>> {
        loop {
            if !self.buf.is_empty() {
                match http1::parse_response(&mut self.buf, method)
                    .map_err(ExchangeError::Invalid)?
                {
                    Answered::Complete(answer) => return Poll::Ready(Ok(answer)),
                    Answered::Informational => continue,
                    Answered::Partial => {}
                }
            }
            if self.buf.len() >= MAX_HEAD {
                return Poll::Ready(Err(ExchangeError::Invalid(format!(
                    "its response head is larger than {MAX_HEAD} bytes"
                ))));
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(ExchangeError::Read {
                        received: *received,
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the connection closed before a complete response head",
                        ),
                    }));
                }
                Ok(_) => *received = true,
                Err(source) => {
                    return Poll::Ready(Err(ExchangeError::Read {
                        received: *received,
                        source,
                    }));
                }
            }
        }
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

/// How long the rest of a request may take to leave once its answer has
/// been read whole (an upstream that answered early, then reads on).
const UPLOAD_AFTER_ANSWER: std::time::Duration = std::time::Duration::from_secs(60);

/// An answer's body, read from the upstream connection as it is polled.
#[derive(Debug)]
pub struct DirectBody<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    /// `None` once the body has ended or failed.
    conn: Option<Box<Conn<T>>>,
    decoder: Decoder,
    /// Where the connection goes when the body ends; `None` if it is not
    /// to be kept.
    idle: Option<Arc<Idle<T>>>,
    /// A failure, reported on the poll after it was met (see `failed`).
    error: Option<io::Error>,
    failed: bool,
    /// The rest of the request, sent while the answer is read; the body
    /// ends (and the connection is pooled) only once it has all left.
    upload: Option<Box<Upload>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> DirectBody<T> {
    /// The answer's head, and its body read from `conn`, which goes back
    /// to `idle` once the body has been read to its end (if the upstream
    /// keeps it open and sent nothing more).
    /// `rest`: what of the request is still to be sent, with its body. An
    /// upstream that answers early and keeps the connection gets the rest
    /// of the body while its answer is read (RFC 9112 §9.3: only one that
    /// closes the connection does not want it).
    pub fn new(
        answer: Answer,
        rest: (Rest, Option<UploadBody>),
        conn: Box<Conn<T>>,
        idle: &Arc<Idle<T>>,
    ) -> (ResponseHead, Self) {
        let (usable, upload) = match rest {
            (Rest::Sent, _) => (true, None),
            (Rest::Unsent(sending), Some(body)) if answer.keep_alive => (
                true,
                Some(Box::new(Upload {
                    sending,
                    body,
                    done: false,
                    kept: None,
                })),
            ),
            _ => (false, None),
        };
        let mut body = DirectBody {
            conn: Some(conn),
            decoder: Decoder::new(answer.framing),
            idle: (answer.keep_alive && usable).then(|| Arc::clone(idle)),
            error: None,
            failed: false,
            upload,
        };
        if body.decoder.is_done() {
            body.finish();
        }
        (answer.head, body)
    }

    /// Sends on what it can of the rest of the request.
    fn drive_upload(&mut self, cx: &mut Context<'_>) {
        let (Some(upload), Some(conn)) = (self.upload.as_mut(), self.conn.as_mut()) else {
            return;
        };
        if upload.done {
            return;
        }
        let mut touched = true;
        let body = Pin::new(&mut upload.body);
        match upload
            .sending
            .poll_send(Pin::new(&mut conn.io), body, cx, &mut touched)
        {
            Poll::Pending => {}
            Poll::Ready(Ok(())) => upload.done = true,
            Poll::Ready(Err(error)) => {
                tracing::debug!(%error, "the rest of a request body could not be sent after an early answer");
                self.upload = None;
                // The upstream did not get the whole request.
                self.idle = None;
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> DirectBody<T> {
    /// A body with nothing in it (a `101` answer's).
    pub fn empty() -> Self {
        Self {
            conn: None,
            decoder: Decoder::new(http1::Framing::Empty),
            idle: None,
            error: None,
            failed: false,
            upload: None,
        }
    }

    /// The body has been read whole: the connection goes back to the pool
    /// if it may be kept and nothing unasked followed the body, once the
    /// rest of the request, if any, has left (in a task of its own, so
    /// that the answer's end does not wait for it).
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let idle = self.idle.take();
        match self.upload.take() {
            Some(upload) if !upload.done => hand_off(conn, *upload, idle),
            // Sent whole: what it kept goes now, with the answer's end.
            _ => pool(conn, idle),
        }
    }

    /// Whether the rest of the request is still being sent.
    pub fn is_uploading(&self) -> bool {
        self.upload.as_ref().is_some_and(|upload| !upload.done)
    }

    /// Keeps `kept` until the whole request has left, or the answer has
    /// ended if that is later (the caller's capacity permit: a request
    /// still being sent is still in flight). Without an upload going on,
    /// `kept` is dropped.
    pub fn keep_while_sending(&mut self, kept: Box<dyn std::any::Any + Send>) {
        if let Some(upload) = self.upload.as_mut() {
            upload.kept = Some(kept);
        }
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
        self.failed = true;
        self.conn = None;
        self.error = Some(error);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Puts `conn` back in `idle`, if it may be kept and nothing unasked
/// followed the answer.
fn pool<T>(mut conn: Box<Conn<T>>, idle: Option<Arc<Idle<T>>>) {
    conn.in_use = None;
    let Some(idle) = idle else {
        return;
    };
    if !conn.buf.is_empty() {
        return;
    }
    if conn.read_size > MIN_READ {
        // A large download's buffer (which `capacity` may not show: it
        // counts only what is left past the last split) is not kept for
        // an idle connection.
        conn.buf = BytesMut::new();
        conn.read_size = MIN_READ;
    }
    if let Ok(mut idle) = idle.lock() {
        idle.push((conn, Instant::now()));
    }
}

/// Sends the rest of a request in a task, then pools the connection (when
/// `idle` says it may be, and the answer was read whole).
fn hand_off<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut conn: Box<Conn<T>>,
    upload: Upload,
    idle: Option<Arc<Idle<T>>>,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        // The whole upload, what it keeps included (a closure would
        // capture only the fields it uses, and drop the rest here).
        let mut upload = upload;
        let sending = poll_fn(|cx| {
            let body = Pin::new(&mut upload.body);
            upload
                .sending
                .poll_send(Pin::new(&mut conn.io), body, cx, &mut true)
        });
        match tokio::time::timeout(UPLOAD_AFTER_ANSWER, sending).await {
            Ok(Ok(())) => pool(conn, idle),
            Ok(Err(error)) => {
                tracing::debug!(%error, "the rest of a request body could not be sent after its answer");
            }
            Err(_) => tracing::debug!("the upstream did not take the rest of a request body after its answer"),
        }
    });
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for DirectBody<T> {
    fn drop(&mut self) {
        // Dropped with the answer read whole but the request not yet sent
        // (the client's side stopped polling at the answer's length): the
        // rest still goes, so the upstream gets the whole request.
        if self.is_uploading() && self.decoder.is_done() && !self.failed {
            self.finish();
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> http_body::Body for DirectBody<T> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        this.drive_upload(cx);
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.buf) {
                Decoded::Data(data) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoded::Trailers(trailers) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Decoded::End => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Decoded::Invalid(message) => {
                    let error = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the upstream {message}"),
                    );
                    return this.failed(cx, error);
                }
                Decoded::More => {}
            }
            // Nothing usable is buffered: read more.
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => match this.decoder.closed() {
                    Ok(()) => {
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    Err(message) => {
                        let error = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the upstream {message}"),
                        );
                        return this.failed(cx, error);
                    }
                },
                Ok(_) => {}
                Err(error) => return this.failed(cx, error),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.failed && self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(remaining) if !self.failed => SizeHint::with_exact(remaining),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HOST;
    use http::{HeaderMap, HeaderValue};
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
        let response = match conn.exchange(&method, "/a?b=%2F", &headers).await {
            Ok(answer) => {
                let (head, body) = DirectBody::new(answer, (Rest::Sent, None), conn, &idle);
                let parts = head.into_parts().expect("valid fields");
                Ok(http::Response::from_parts(parts, body))
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

    /// A body of pieces, one frame each, then its end.
    struct Pieces(std::collections::VecDeque<Bytes>);

    impl http_body::Body for Pieces {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|piece| Ok(Frame::data(piece))))
        }
    }

    fn pieces(pieces: &[&'static [u8]]) -> Pieces {
        Pieces(
            pieces
                .iter()
                .map(|piece| Bytes::from_static(piece))
                .collect(),
        )
    }

    /// Sends `POST /up` with `body`, framed so, on `conn`.
    async fn post(
        conn: &mut Conn<DuplexStream>,
        framing: BodyFraming,
        body: &mut Pieces,
    ) -> Result<(Answer, Rest), ExchangeError> {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("upstream"));
        if let BodyFraming::Length(length) = framing {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        let mut touched = false;
        let sent = conn
            .exchange_with_body(&Method::POST, "/up", &headers, framing, body, &mut touched)
            .await;
        assert!(touched);
        sent
    }

    /// Sends a POST with `body`, framed so, to an upstream that reads
    /// `wanted` bytes of request (all of it, or fewer to answer early),
    /// then answers `reply` and stays open. The request as the upstream
    /// read it, the answer's body, whether the whole body was sent, and
    /// how many connections went back to the pool.
    async fn send_body(
        framing: BodyFraming,
        mut body: Pieces,
        wanted: usize,
        reply: &'static [u8],
    ) -> Result<(String, Vec<u8>, bool, usize), ExchangeError> {
        let (ours, mut theirs) = duplex(64);
        let upstream = tokio::spawn(async move {
            let mut request = vec![0u8; wanted];
            let _ = theirs.read_exact(&mut request).await;
            let _ = theirs.write_all(reply).await;
            (request, theirs)
        });
        let mut conn = Conn::new(ours);
        let idle = Arc::new(Idle::default());
        let (answer, rest) = post(&mut conn, framing, &mut body).await?;
        let sent = matches!(rest, Rest::Sent);
        let upload: UploadBody = Box::new(body);
        let (head, body) = DirectBody::new(answer, (rest, Some(upload)), conn, &idle);
        let parts = head.into_parts().expect("valid fields");
        let (data, _) = read(http::Response::from_parts(parts, body))
            .await
            .expect("the answer's body");
        let (request, _theirs) = upstream.await.expect("upstream");
        Ok((
            String::from_utf8_lossy(&request).into_owned(),
            data,
            sent,
            pooled(&idle),
        ))
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    #[tokio::test]
    async fn a_body_is_sent_by_its_length_or_chunked() {
        let head = "POST /up HTTP/1.1\r\nhost: upstream\r\n";
        let sized = format!("{head}content-length: 11\r\n\r\nhello world");
        let (request, data, sent, pooled) = send_body(
            BodyFraming::Length(11),
            pieces(&[b"hello", b"", b" world"]),
            sized.len(),
            OK,
        )
        .await
        .expect("an answer");
        assert_eq!(
            (request, data, sent, pooled),
            (sized, b"ok".to_vec(), true, 1)
        );

        let chunked = format!(
            "{head}transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        );
        let (request, _, sent, pooled) = send_body(
            BodyFraming::Chunked,
            pieces(&[b"hello", b" world"]),
            chunked.len(),
            OK,
        )
        .await
        .expect("an answer");
        assert_eq!((request, sent, pooled), (chunked, true, 1));
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_body_is_passed_on_and_the_connection_dropped() {
        // The upstream reads the head only, answers, and reads no more: a
        // body larger than the pipe cannot all be written.
        let big: &'static [u8] = Box::leak(vec![b'x'; 64 * 1024].into_boxed_slice());
        let (_, data, sent, pooled) = send_body(
            BodyFraming::Length(big.len() as u64),
            pieces(&[big]),
            20,
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\nno",
        )
        .await
        .expect("the early answer");
        assert_eq!((data.as_slice(), sent, pooled), (&b"no"[..], false, 0));
    }

    #[tokio::test]
    async fn an_early_answer_gets_the_rest_of_the_body_then_the_next_request() {
        for framing in [BodyFraming::Length(65_536), BodyFraming::Chunked] {
            let (ours, mut theirs) = duplex(1024);
            // Answers as soon as it has the head, then reads on: the whole
            // body, then the next request on the same connection.
            let upstream = tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = theirs.read(&mut buf).await.unwrap_or(0);
                    assert!(n > 0, "closed before the head");
                    seen.extend_from_slice(&buf[..n]);
                }
                let _ = theirs.write_all(OK).await;
                while !String::from_utf8_lossy(&seen).contains("GET /next") {
                    let n = theirs.read(&mut buf).await.unwrap_or(0);
                    assert!(n > 0, "closed before the next request");
                    seen.extend_from_slice(&buf[..n]);
                }
                seen
            });
            let big: &'static [u8] = Box::leak(vec![b'x'; 65_536].into_boxed_slice());
            let mut body = pieces(&[&big[..30_000], &big[30_000..]]);
            let idle = Arc::new(Idle::default());
            let mut conn = Conn::new(ours);
            let (answer, rest) = post(&mut conn, framing, &mut body)
                .await
                .expect("an answer");
            assert!(
                !matches!(rest, Rest::Sent),
                "answered before the whole body"
            );
            let upload: UploadBody = Box::new(body);
            let (head, body) = DirectBody::new(answer, (rest, Some(upload)), conn, &idle);
            let parts = head.into_parts().expect("valid fields");
            let (data, _) = read(http::Response::from_parts(parts, body))
                .await
                .expect("body");
            assert_eq!(data, b"ok");
            // The rest of the body leaves, then the connection is pooled.
            let mut waited = 0;
            while pooled(&idle) == 0 && waited < 500 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                waited += 1;
            }
            let (mut conn, _) = idle
                .lock()
                .expect("lock")
                .pop()
                .expect("pooled after the upload");
            let _ = conn
                .exchange(&Method::GET, "/next", &HeaderMap::new())
                .await;
            let seen = upstream.await.expect("upstream");
            let seen = String::from_utf8_lossy(&seen);
            let (_, after_head) = seen.split_once("\r\n\r\n").expect("a head");
            let expected_body = match framing {
                BodyFraming::Length(_) => String::from_utf8_lossy(big).into_owned(),
                BodyFraming::Chunked => format!(
                    "7530\r\n{}\r\n{:X}\r\n{}\r\n0\r\n\r\n",
                    "x".repeat(30_000),
                    65_536 - 30_000,
                    "x".repeat(65_536 - 30_000)
                ),
            };
            assert!(after_head.starts_with(&expected_body), "{framing:?}");
            assert!(
                after_head[expected_body.len()..].starts_with("GET /next HTTP/1.1\r\n"),
                "{framing:?}: the next request must follow the body exactly"
            );
        }
    }

    #[tokio::test]
    async fn a_body_that_breaks_its_length_fails() {
        for (length, body) in [(3, &[&b"abcd"[..]][..]), (5, &[b"abc"])] {
            let result = send_body(BodyFraming::Length(length), pieces(body), 1_000, OK).await;
            assert!(matches!(result, Err(ExchangeError::Body(_))), "{length}");
        }
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
        let kept = |reply: &'static [u8], pooled: usize| async move {
            let (response, idle, _upstream) = send(Method::GET, reply, 4096, false).await;
            let body = read(response.expect("a response")).await.expect("body").0;
            assert_eq!(body, b"ok");
            assert_eq!(
                self::pooled(&idle),
                pooled,
                "{}",
                String::from_utf8_lossy(reply)
            );
        };
        for reply in replies {
            kept(reply, 0).await;
        }
        // HTTP/1.0 with keep-alive.
        kept(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
            1,
        )
        .await;
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
            "a".repeat(crate::http1::body::MAX_TRAILERS)
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
            let bytes = crate::http1::testing::mangled(&mut rng, &seeds);
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
