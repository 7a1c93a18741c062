//! Accepting and serving connections, with bounds on what each may hold.
//!
//! `axum::serve` has no timeouts and no connection cap, so slow or idle
//! clients could hold the server's sockets, request slots and memory for as
//! long as they like. Here each TCP connection is served by hyper's HTTP/1
//! connection, watched ([`tracker`], [`io`]):
//!
//! - a request head must arrive within the header timeout of the connection's
//!   opening (or of the first byte of a later request), and a kept-alive
//!   connection may wait the idle timeout for its next request;
//! - a body must arrive within the body timeout (`http::read_body`);
//! - a write that makes no progress for the idle timeout fails, so a client
//!   that stops reading its response does not keep it in memory;
//! - at most `max_connections` are open. At the cap a new connection closes
//!   one of those not handling a request now: first those that never sent
//!   a whole request nor had one handled (oldest first), then those kept
//!   alive between requests, then those whose request waits for a permit or
//!   for its client to read ([`tracker::Registry::evict_oldest`]). So under
//!   overload the connections that trickle or send nothing make room for
//!   each other, and clients that work keep theirs. Only handled requests
//!   are safe, and there are at most as many as there are request permits,
//!   so a flood of slow connections cannot keep out a health check or a read.
//!
//! On shutdown the server stops accepting, lets requests in flight finish
//! for the shutdown grace, then closes whatever is left.

mod io;
mod tracker;

use crate::state::Shared;
use crate::ServerConfig;
use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;
pub(crate) use tracker::Registry;
use tracker::{Conn, InRequest, Registered, Timeouts};

/// How a request reaches its connection: handlers mark it handled (see
/// [`Conn::handling`]) while they hold a request permit.
#[derive(Clone)]
pub(crate) struct ConnHandle(Arc<Conn>);

impl ConnHandle {
    pub(crate) fn handling(&self) -> tracker::Handling {
        self.0.handling()
    }
}

/// Connections accepted at the cap that may wait at once for the slot an
/// eviction frees: beyond `max_connections`, the most sockets the server
/// holds open.
const WAITING_MAX: usize = 64;

/// How an accepted connection gets its slot.
enum Admission {
    /// A slot was free.
    Now(OwnedSemaphorePermit),
    /// At the cap: a place among the waiting connections, and the slots to
    /// wait on.
    Waiting(OwnedSemaphorePermit, Arc<Semaphore>),
}

/// What bounds the connections of one server.
#[derive(Debug, Clone, Copy)]
struct Limits {
    timeouts: Timeouts,
    max_connections: usize,
    shutdown_grace: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves (see the module doc).
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    state: Shared,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let limits = Limits {
        timeouts: Timeouts {
            header: config.header_timeout,
            idle: config.idle_timeout,
        },
        max_connections: config.max_connections.max(1),
        shutdown_grace: config.shutdown_grace,
    };
    let tls = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let registry = state.connections.clone();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let waiting = Arc::new(Semaphore::new(WAITING_MAX));
    let (stop, stopping) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next() => continue,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => tcp,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // At the cap, a connection waits for the slot its eviction frees
        // in a task of its own, so that under load (when the evicted
        // connection's task may take a while to be scheduled) the loop goes
        // on accepting: a health check is not stuck behind the queue.
        let admitted = match slots.clone().try_acquire_owned() {
            Ok(slot) => Admission::Now(slot),
            Err(_) => {
                if registry.evict_oldest() {
                    state.metrics.connection_evicted();
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    waiting = waiting.clone().acquire_owned() => {
                        Admission::Waiting(waiting.expect("never closed"), slots.clone())
                    }
                }
            }
        };
        let (registry, app, state, tls) =
            (registry.clone(), app.clone(), state.clone(), tls.clone());
        let mut stopping = stopping.clone();
        tasks.spawn(async move {
            let slot = match admitted {
                Admission::Now(slot) => slot,
                Admission::Waiting(_waiting, slots) => tokio::select! {
                    slot = slots.acquire_owned() => slot.expect("never closed"),
                    _ = stopping.wait_for(|stop| *stop) => return,
                },
            };
            state.metrics.connection_opened();
            let connection = Connection {
                registered: registry.open(),
                _slot: slot,
                app,
                state,
                limits,
                tls,
            };
            connection.serve(tcp, stopping).await;
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!(
            connections = tasks.len(),
            grace = ?limits.shutdown_grace,
            "closing connections still busy after the shutdown grace"
        );
        tasks.shutdown().await;
    }
}

/// One accepted connection and what it holds while it is open (counted in
/// the metrics from its creation to its drop).
struct Connection {
    registered: Registered,
    _slot: OwnedSemaphorePermit,
    app: Router,
    state: Shared,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A connection's byte stream: the watched socket, or TLS over it.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

impl Connection {
    async fn serve(self, tcp: TcpStream, mut stopping: watch::Receiver<bool>) {
        if let Err(e) = tcp.set_nodelay(true) {
            // Small responses (HEADs, missing lists) should not wait for Nagle.
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let metrics = &self.state.metrics;
        let conn = self.registered.conn().clone();
        let io = io::WatchedIo::new(tcp, conn.clone(), self.limits.timeouts.idle);
        let io: Box<dyn Stream> = match &self.tls {
            None => Box::new(io),
            // The handshake is part of the request head: it gets the header timeout.
            Some(acceptor) => {
                match tokio::time::timeout(self.limits.timeouts.header, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => Box::new(tls),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics.connection_timed_out();
                        return;
                    }
                }
            }
        };
        let handle = ConnHandle(conn.clone());
        let app = self.app.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let in_request = conn.request_started();
            request.extensions_mut().insert(handle.clone());
            let response = app.clone().oneshot(request);
            async move {
                let response = response.await?;
                Ok::<_, Infallible>(response.map(|body| Answer {
                    body,
                    _in_request: in_request,
                }))
            }
        });
        // The header timeout is ours (`tracker`): hyper's would also bound
        // the idle time between requests.
        let http = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .serve_connection(TokioIo::new(io), service);
        tokio::pin!(http);
        let conn = self.registered.conn();
        let mut draining = false;
        loop {
            tokio::select! {
                served = http.as_mut() => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break;
                }
                why = conn.expired(&self.limits.timeouts) => {
                    tracing::debug!(why, "connection timed out");
                    metrics.connection_timed_out();
                    break;
                }
                () = conn.evicted() => {
                    tracing::debug!("connection closed to make room for a new one");
                    break;
                }
                _ = stopping.wait_for(|stop| *stop), if !draining => {
                    http.as_mut().graceful_shutdown();
                    draining = true;
                }
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.state.metrics.connection_closed();
    }
}

/// A response body that keeps its request in progress until it is sent (or
/// dropped), so the connection's phase follows its requests.
struct Answer {
    body: Body,
    _in_request: InRequest,
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
