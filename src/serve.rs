//! The accept loop shared by the proxy and admin listeners: HTTP/1.1 and
//! HTTP/2 with prior knowledge on one port, graceful drain on shutdown.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::listen::ProxyListener;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// HTTP/2 connections are pinged this often, and closed when a ping goes
/// unanswered this long.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// The HTTP/2 connection preface: until a connection has shown whether it
/// speaks HTTP/1 or HTTP/2, no server-library timer runs.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection that must show, within a deadline, that it speaks HTTP/1
/// (its first byte departs from the HTTP/2 preface; hyper's header timer
/// takes over) or send the whole HTTP/2 preface. A client that connects and
/// sends nothing, or part of the preface, is cut at the deadline instead of
/// holding a descriptor for ever.
#[derive(Debug)]
struct FirstBytes<IO> {
    io: IO,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    matched: usize,
}

impl<IO> FirstBytes<IO> {
    fn new(io: IO, timeout: Duration) -> Self {
        Self {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            matched: 0,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FirstBytes<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.deadline.is_some() {
                    for byte in &buf.filled()[before..] {
                        if H2_PREFACE.get(this.matched) == Some(byte) {
                            this.matched += 1;
                        } else {
                            this.matched = H2_PREFACE.len();
                        }
                        if this.matched >= H2_PREFACE.len() {
                            this.deadline = None;
                            break;
                        }
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent no request within proxy.header_timeout",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FirstBytes<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Pause after a failed accept (out of file descriptors, say), so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `service` on `listener` until `stop` fires, then lets open
/// connections finish their requests for up to `grace`.
/// Oversized, malformed or ambiguously framed requests are refused by hyper
/// itself before the service sees them.
pub async fn serve<S, B>(
    listener: ProxyListener,
    service: S,
    stop: CancellationToken,
    grace: Duration,
    header_timeout: Duration,
    name: &'static str,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client gets `header_timeout` to send a request's headers (slowloris).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE)
        .keep_alive_timeout(H2_KEEP_ALIVE);
    let graceful = GracefulShutdown::new();
    // Cancelled when the grace period runs out: ends what is still open.
    let cut = CancellationToken::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(listener = name, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let connection = builder
            .serve_connection(
                TokioIo::new(FirstBytes::new(stream, header_timeout)),
                service.clone(),
            )
            .into_owned();
        let watched = graceful.watch(connection);
        let cut = cut.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = watched => if let Err(error) = result {
                    tracing::debug!(listener = name, error = %error, "connection ended with an error");
                },
                _ = cut.cancelled() => {}
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!(listener = name, "all connections closed"),
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(listener = name, grace_s = grace.as_secs_f64(), "shutdown grace elapsed: closing the remaining connections");
        }
    }
    cut.cancel();
}
