//! The proxy's response body: the upstream's stream or a body of its own,
//! holding what the request holds until its last byte is sent.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use tokio::sync::OwnedSemaphorePermit;

use super::access::Exchange;
use crate::upstream::UpstreamBody;

/// What the proxy answers with: the upstream's stream or a body of its own,
/// holding the request's capacity permit, and the upstream connection it
/// streams from, until the last byte is sent.
#[derive(Debug)]
pub struct ProxyBody {
    inner: Either<UpstreamBody, Full<Bytes>>,
    held: Option<Held>,
}

/// Released when the body ends (or is dropped).
#[derive(Debug)]
struct Held {
    _permit: Option<OwnedSemaphorePermit>,
    /// The request's record: counted and logged when released.
    exchange: Option<Box<Exchange>>,
}

impl ProxyBody {
    /// The upstream's body (whose connection goes back to the pool when
    /// it has been read whole). While the rest of the request is still
    /// being sent (the upstream answered early), the permit stays with the
    /// sending, which may outlast the answer.
    pub fn upstream(mut body: UpstreamBody, permit: Option<OwnedSemaphorePermit>) -> Self {
        let permit = match (&mut body, permit) {
            (Either::Right(direct), Some(permit)) if direct.is_uploading() => {
                direct.keep_while_sending(Box::new(permit));
                None
            }
            (_, permit) => permit,
        };
        Self {
            inner: Either::Left(body),
            held: Some(Held {
                _permit: permit,
                exchange: None,
            }),
        }
    }

    /// A body the proxy made.
    pub fn full(bytes: Bytes, permit: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            inner: Either::Right(Full::new(bytes)),
            held: Some(Held {
                _permit: permit,
                exchange: None,
            }),
        }
    }

    /// Keeps the request's record until the body ends, counting the
    /// bytes that go out.
    pub(crate) fn observe(&mut self, exchange: Box<Exchange>) {
        match &mut self.held {
            Some(held) => held.exchange = Some(exchange),
            // Already over: recorded at once.
            None => drop(exchange),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Some(Held {
                exchange: Some(exchange),
                ..
            }) = &mut self.held
        {
            exchange.sent += data.len() as u64;
        }
        if frame.is_none() || self.inner.is_end_stream() {
            // The last byte is out: the next request may have the
            // connection and the capacity.
            self.held = None;
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
