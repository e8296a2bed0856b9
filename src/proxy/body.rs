//! Body wrappers: a request body that says when it has been sent in full (the
//! response deadline starts then), and the proxy's response body.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::oneshot;

/// What the proxy answers with: the upstream's stream, or a body of its own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// A request body streamed to the upstream that signals, by sending or by
/// being dropped, that the upstream has taken all of it.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    done: Option<oneshot::Sender<()>>,
}

impl<B: Body> TrackedBody<B> {
    /// Wraps `inner`; the receiver resolves once the body is sent or dropped.
    /// An empty body needs no signal: its receiver is `None`.
    pub fn new(inner: B) -> (Self, Option<oneshot::Receiver<()>>) {
        if inner.is_end_stream() {
            return (Self { inner, done: None }, None);
        }
        let (tx, rx) = oneshot::channel();
        (
            Self {
                inner,
                done: Some(tx),
            },
            Some(rx),
        )
    }
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if frame.is_none() || this.inner.is_end_stream() {
            if let Some(done) = this.done.take() {
                let _ = done.send(());
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
