//! Serving: the accept loop shared by the proxy and admin listeners
//! (HTTP/1.1 and HTTP/2 with prior knowledge on one port), the proxy's
//! worker threads, graceful drain on shutdown, and the lean HTTP/1.1
//! driver (`lean`) that serves requests without a body without hyper's
//! server. What a service does with a request is not known here: only
//! the [`HttpService`] and [`Bodiless`] traits.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{mpsc, oneshot};
use tokio_util::either::Either;

use crate::http1::H2_PREFACE;
use crate::listen::{Connection, ProxyListener};
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) mod lean;
pub mod service;

pub use service::{Bodiless, BoxError, HttpService};

/// HTTP/2 connections are pinged this often, and closed when a ping goes
/// unanswered this long.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// A connection that must show, within a deadline, that it speaks HTTP/1
/// (its first byte departs from the HTTP/2 preface; hyper's header timer
/// takes over) or send the whole HTTP/2 preface. A client that connects and
/// sends nothing, or part of the preface, is cut at the deadline instead of
/// holding a descriptor for ever. Bytes already read from the connection
/// (by the lean path, before it handed the connection over) come first.
#[derive(Debug)]
struct FirstBytes<IO> {
    io: IO,
    read: Bytes,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    matched: usize,
}

impl<IO> FirstBytes<IO> {
    fn new(io: IO, timeout: Duration) -> Self {
        Self::after(Bytes::new(), io, timeout)
    }

    /// `io`, whose first bytes, `read`, were already read from it.
    fn after(read: Bytes, io: IO, timeout: Duration) -> Self {
        Self {
            io,
            read,
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
        let polled = if this.read.is_empty() {
            Pin::new(&mut this.io).poll_read(cx, buf)
        } else {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read.split_to(n));
            Poll::Ready(Ok(()))
        };
        match polled {
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

/// The next connection on `listener`; a failed accept is logged and tried
/// again after `ACCEPT_ERROR_PAUSE`.
async fn next_connection(listener: &ProxyListener, name: &'static str) -> Connection {
    loop {
        match listener.accept().await {
            Ok(stream) => return stream,
            Err(error) => {
                tracing::warn!(listener = name, %error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// The HTTP/1.1 and h2c server settings shared by every listener.
fn http_builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
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
    builder
}

/// Serves a connection with hyper until it closes; once `closing` fires,
/// hyper finishes the request in progress and closes it.
async fn with_hyper<IO, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: IO,
    service: S,
    closing: &CancellationToken,
) -> Result<(), BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService,
{
    // With upgrades: a WebSocket handshake that the upstream accepts
    // hands the connection over to the service's tunnel.
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    // The connection first: bytes the lean path already read are a
    // request that hyper must see before it is told to close.
    tokio::select! {
        biased;
        result = connection.as_mut() => return result,
        () = closing.cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    connection.await
}

/// Calls its function when dropped.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// The connections of one runtime: served, then drained on shutdown.
struct Connections {
    builder: Arc<auto::Builder<TokioExecutor>>,
    header_timeout: Duration,
    /// Fires when shutdown begins: each connection finishes the request
    /// it is serving, then closes.
    closing: CancellationToken,
    /// The connections' tasks, waited for by `drain`.
    tasks: TaskTracker,
    /// Cancelled when the grace period runs out: ends what is still open.
    /// Workers have none: dropping their runtime ends what is left.
    cut: Option<CancellationToken>,
    name: &'static str,
}

impl Connections {
    fn new(header_timeout: Duration, name: &'static str, cut: bool) -> Self {
        Self {
            builder: Arc::new(http_builder(header_timeout)),
            header_timeout,
            closing: CancellationToken::new(),
            tasks: TaskTracker::new(),
            cut: cut.then(CancellationToken::new),
            name,
        }
    }

    /// Serves one connection with hyper in a task of the current runtime;
    /// `ended` runs when it closes.
    fn spawn<S: HttpService>(
        &self,
        stream: Connection,
        service: S,
        ended: impl FnOnce() + Send + 'static,
    ) {
        let builder = Arc::clone(&self.builder);
        let closing = self.closing.clone();
        let io = FirstBytes::new(stream, self.header_timeout);
        self.run(
            async move { with_hyper(&builder, io, service, &closing).await },
            ended,
        );
    }

    /// Serves one connection in a task of the current runtime: requests
    /// without a body on the lean path, the rest of the connection by
    /// hyper from the first request that needs it; `ended` runs when it
    /// closes.
    fn spawn_lean<S: Bodiless>(
        &self,
        mut stream: Connection,
        service: S,
        ended: impl FnOnce() + Send + 'static,
    ) {
        let builder = Arc::clone(&self.builder);
        let closing = self.closing.clone();
        let header_timeout = self.header_timeout;
        self.run(
            async move {
                match lean::serve(&mut stream, &service, header_timeout, &closing).await {
                    lean::Ended::Closed => Ok(()),
                    lean::Ended::Hyper(read) => {
                        let io = FirstBytes::after(read, stream, header_timeout);
                        with_hyper(&builder, io, service, &closing).await
                    }
                }
            },
            ended,
        );
    }

    /// Runs a connection's task, tracked for `drain`; `ended` runs however
    /// the task ends: finished, panicked or dropped.
    fn run(
        &self,
        connection: impl Future<Output = Result<(), BoxError>> + Send + 'static,
        ended: impl FnOnce() + Send + 'static,
    ) {
        let cut = self.cut.clone();
        let name = self.name;
        let ended = OnDrop(Some(ended));
        self.tasks.spawn(async move {
            let result = match cut {
                Some(cut) => tokio::select! {
                    result = connection => result,
                    () = cut.cancelled() => Ok(()),
                },
                None => connection.await,
            };
            if let Err(error) = result {
                tracing::debug!(listener = name, error = %error, "connection ended with an error");
            }
            drop(ended);
        });
    }

    /// Lets open connections finish their requests for up to `grace`, then
    /// closes what is left.
    /// `beside`: what else must end within the grace (a service's tunnels).
    async fn drain(self, grace: Duration, beside: impl Future<Output = ()>) {
        let name = self.name;
        self.closing.cancel();
        self.tasks.close();
        let ended = async {
            self.tasks.wait().await;
            beside.await;
        };
        tokio::select! {
            () = ended => tracing::debug!(listener = name, "all connections closed"),
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(listener = name, grace_s = grace.as_secs_f64(), "shutdown grace elapsed: closing the remaining connections");
            }
        }
        if let Some(cut) = &self.cut {
            cut.cancel();
        }
    }
}

/// Serves `service` on `listener` in the current runtime until `stop`
/// fires, then lets open connections finish their requests for up to
/// `grace`. Oversized, malformed or ambiguously framed requests are refused
/// by hyper itself before the service sees them.
pub async fn serve<S: HttpService>(
    listener: ProxyListener,
    service: S,
    stop: CancellationToken,
    grace: Duration,
    header_timeout: Duration,
    name: &'static str,
) {
    let connections = Connections::new(header_timeout, name, true);
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            stream = next_connection(&listener, name) => stream,
        };
        connections.spawn(stream, service.clone(), || {});
    }
    drop(listener);
    connections.drain(grace, std::future::ready(())).await;
}

/// A connection on its way from the accepting runtime to a worker's.
type Handoff = Either<std::net::TcpStream, std::os::unix::net::UnixStream>;

/// One worker: a thread running its own single-threaded runtime. A
/// connection stays on the worker it was handed to, with its upstream
/// connections, so a request never crosses threads (no wake-ups between
/// cores, no shared connection pool).
struct Worker {
    connections: mpsc::UnboundedSender<Handoff>,
    /// Connections open on this worker.
    open: Arc<AtomicUsize>,
    /// Fires (or is dropped) when the worker's thread ends.
    done: oneshot::Receiver<()>,
}

/// The proxy's workers, started by [`Workers::start`] and fed by
/// [`Workers::serve`].
pub struct Workers {
    workers: Vec<Worker>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("count", &self.workers.len())
            .finish()
    }
}

impl Workers {
    /// Starts `count` worker threads. `make_service` runs once in each,
    /// inside its runtime, so what the service spawns (upstream connection
    /// tasks) stays on that worker.
    pub fn start<F, S>(
        count: usize,
        make_service: F,
        grace: Duration,
        header_timeout: Duration,
    ) -> io::Result<Self>
    where
        F: Fn() -> S + Send + Sync + 'static,
        S: Bodiless,
    {
        let make_service = Arc::new(make_service);
        let mut workers = Vec::with_capacity(count);
        for index in 0..count.max(1) {
            let (started_sender, started) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
            let (sender, mut receiver) = mpsc::unbounded_channel::<Handoff>();
            let (done_sender, done) = oneshot::channel();
            let open = Arc::new(AtomicUsize::new(0));
            let worker_open = Arc::clone(&open);
            let make_service = Arc::clone(&make_service);
            std::thread::Builder::new()
                .name(format!("bearer-proxy-worker-{index}"))
                .spawn(move || {
                    // Built here, not handed over: a runtime must not be
                    // dropped inside another (as it would be if the thread
                    // could not start).
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => {
                            let _ = started_sender.send(Ok(()));
                            runtime
                        }
                        Err(error) => {
                            let _ = started_sender.send(Err(error));
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let service = make_service();
                        let connections = Connections::new(header_timeout, "proxy", false);
                        while let Some(handoff) = receiver.recv().await {
                            let stream = match handoff {
                                Either::Left(tcp) => {
                                    tokio::net::TcpStream::from_std(tcp).map(Either::Left)
                                }
                                Either::Right(unix) => {
                                    tokio::net::UnixStream::from_std(unix).map(Either::Right)
                                }
                            };
                            let open = Arc::clone(&worker_open);
                            match stream {
                                Ok(stream) => {
                                    let counted = service.connection_opened();
                                    connections.spawn_lean(stream, service.clone(), move || {
                                        open.fetch_sub(1, Ordering::Relaxed);
                                        drop(counted);
                                    })
                                }
                                Err(error) => {
                                    open.fetch_sub(1, Ordering::Relaxed);
                                    tracing::warn!(%error, "cannot serve an accepted connection");
                                }
                            }
                        }
                        connections.drain(grace, service.drained()).await;
                    });
                    // Dropping the runtime ends whatever the grace left.
                    drop(runtime);
                    let _ = done_sender.send(());
                })?;
            started
                .recv()
                .map_err(|_| io::Error::other("a worker thread ended while starting"))??;
            workers.push(Worker {
                connections: sender,
                open,
                done,
            });
        }
        Ok(Self { workers })
    }

    /// Accepts connections on `listener` and hands each to the worker with
    /// the fewest open, until `stop` fires; then waits for the workers to
    /// drain. Returns early, with a message, if every worker has ended.
    pub async fn serve(
        self,
        listener: ProxyListener,
        stop: CancellationToken,
    ) -> Result<(), String> {
        let Workers { workers } = self;
        let mut live: Vec<&Worker> = workers.iter().collect();
        let mut next = 0usize;
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => break,
                stream = next_connection(&listener, "proxy") => stream,
            };
            let mut handoff = match stream {
                Either::Left(tcp) => tcp.into_std().map(Either::Left),
                Either::Right(unix) => unix.into_std().map(Either::Right),
            };
            loop {
                let stream = match handoff {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "cannot hand an accepted connection to a worker");
                        break;
                    }
                };
                if live.is_empty() {
                    return Err("every proxy worker thread has stopped".to_owned());
                }
                // The least busy worker; ties go round the workers in turn.
                next = (next + 1) % live.len();
                let index = (0..live.len())
                    .map(|offset| (next + offset) % live.len())
                    .min_by_key(|&i| live[i].open.load(Ordering::Relaxed))
                    .unwrap_or(0);
                let worker = live[index];
                worker.open.fetch_add(1, Ordering::Relaxed);
                match worker.connections.send(stream) {
                    Ok(()) => break,
                    Err(returned) => {
                        tracing::error!("a proxy worker thread has stopped");
                        live.remove(index);
                        handoff = Ok(returned.0);
                    }
                }
            }
        }
        drop(listener);
        let mut waiting = Vec::with_capacity(workers.len());
        for worker in workers {
            drop(worker.connections);
            waiting.push(worker.done);
        }
        for done in waiting {
            let _ = done.await;
        }
        Ok(())
    }
}
