//! A request body on its way to the upstream that records when it last
//! made progress: the response deadline counts from then.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// When a request body last moved, and whether it has been sent in full.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    last_nanos: AtomicU64,
    done: AtomicBool,
    client_failed: AtomicBool,
    /// Bytes of the body taken from the client so far.
    bytes: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            last_nanos: AtomicU64::new(0),
            done: AtomicBool::new(false),
            client_failed: AtomicBool::new(false),
            bytes: AtomicU64::new(0),
        }
    }

    fn touch(&self, done: bool) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos.store(nanos, Ordering::Relaxed);
        if done {
            self.done.store(true, Ordering::Relaxed);
        }
    }

    /// The last time a piece of the body went to the upstream.
    pub fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed))
    }

    /// Whether reading the client's body failed (bad chunk, connection lost).
    pub fn client_failed(&self) -> bool {
        self.client_failed.load(Ordering::Relaxed)
    }

    /// Bytes of the body taken from the client so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether the whole body has been sent.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }
}

/// A request body streamed to the upstream that records its progress.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    activity: Option<Arc<Activity>>,
}

impl<B: Body> TrackedBody<B> {
    /// Wraps `inner`; an empty body needs no tracking and gets `None`.
    pub fn new(inner: B) -> (Self, Option<Arc<Activity>>) {
        if inner.is_end_stream() {
            return (
                Self {
                    inner,
                    activity: None,
                },
                None,
            );
        }
        let activity = Arc::new(Activity::new());
        (
            Self {
                inner,
                activity: Some(Arc::clone(&activity)),
            },
            Some(activity),
        )
    }
}

impl<B: Body<Data: bytes::Buf> + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(activity) = &this.activity {
            match &frame {
                Some(Err(_)) => activity.client_failed.store(true, Ordering::Relaxed),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let len = bytes::Buf::remaining(data) as u64;
                        activity.bytes.fetch_add(len, Ordering::Relaxed);
                    }
                }
                None => {}
            }
            activity.touch(frame.is_none() || this.inner.is_end_stream());
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

impl<B> Drop for TrackedBody<B> {
    fn drop(&mut self) {
        // Dropped by the client connection: nothing more will be sent.
        if let Some(activity) = &self.activity
            && !activity.is_done()
        {
            activity.touch(true);
        }
    }
}
