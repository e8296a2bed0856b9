//! What the listeners serve: a hyper service, and for the proxy's lean
//! HTTP/1.1 path, one that can also answer a request from its head alone.

use std::future::Future;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;

use crate::http1::{RequestHead, ResponseHead};

/// An error of a service or its body, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the listeners serve: a hyper service whose futures and bodies can
/// move between tasks. Implemented for every such service.
pub trait HttpService:
    hyper::service::Service<
        Request<Incoming>,
        Response = Response<Self::Body>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + Sync
    + 'static
{
    /// The response body.
    type Body: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> HttpService for S
where
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
    type Body = B;
}

/// A service that can also answer a request without a body from its head
/// alone: what the proxy's workers serve, on their lean HTTP/1.1 path.
pub trait Bodiless: HttpService<Body: http_body::Body<Data = Bytes, Error: Send>> {
    /// The answer to `request`, which has no body. Its fields, and the
    /// answer's, may be as they arrived: then no header map is built.
    fn call_bodiless(
        &self,
        request: RequestHead,
    ) -> impl Future<Output = (ResponseHead, Self::Body)> + Send + '_;

    /// A client connection has opened: counted open until the guard
    /// returned is dropped, when it closes.
    fn connection_opened(&self) -> Option<crate::metrics::Open> {
        None
    }

    /// Ends when what the service runs beside its connections (tunnels
    /// after an upgrade) has ended; waited for on shutdown, within the
    /// grace period, after the connections.
    fn drained(&self) -> impl Future<Output = ()> + Send + 'static {
        std::future::ready(())
    }
}
