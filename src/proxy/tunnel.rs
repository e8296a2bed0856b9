//! A switched connection (WebSocket): bytes relayed both ways between the
//! client and the upstream until either side closes, or nothing has moved
//! for `proxy.tunnel_idle_timeout`. The tunnel holds its request's
//! capacity permit, so open tunnels count towards `proxy.max_concurrent`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// Waits for the client's side of the upgrade, then relays.
pub async fn relay<U>(
    client: OnUpgrade,
    upstream: U,
    early: Bytes,
    idle_timeout: Duration,
    permit: Option<OwnedSemaphorePermit>,
) where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let _permit = permit;
    let client = match client.await {
        Ok(upgraded) => TokioIo::new(upgraded),
        Err(error) => {
            tracing::debug!(%error, "the client's side of an upgrade failed");
            return;
        }
    };
    let activity = Arc::new(Activity::new());
    let mut client = Watched {
        io: client,
        activity: Arc::clone(&activity),
    };
    let mut upstream = Watched {
        io: upstream,
        activity: Arc::clone(&activity),
    };
    let relayed = async {
        // What the upstream sent right behind its 101 goes first.
        if !early.is_empty() {
            client.write_all(&early).await?;
        }
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await
    };
    tokio::select! {
        result = relayed => match result {
            Ok((up, down)) => tracing::debug!(up, down, "a tunnel closed"),
            Err(error) => tracing::debug!(%error, "a tunnel broke off"),
        },
        () = activity.idle_for(idle_timeout) => {
            tracing::debug!(
                idle_s = idle_timeout.as_secs_f64(),
                "a tunnel was idle for proxy.tunnel_idle_timeout: closed"
            );
        }
    }
}

/// When bytes last moved either way.
#[derive(Debug)]
struct Activity {
    base: Instant,
    last_millis: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            last_millis: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let millis = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_millis.store(millis, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_millis.load(Ordering::Relaxed))
    }

    /// Ends once nothing has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let deadline = self.last() + limit;
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// An I/O object that records when bytes go through it.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
