//! The HTTP/1.1 server loop: a connection limit and a header-read time limit, so slow or idle clients
//! cannot starve the Passthru, and a graceful stop that lets answers in flight finish.
//!
//! `axum::serve` has neither limit. hyper's own http1 connection builder is used directly, not
//! hyper-util's `auto` builder: that one first waits for the client's opening bytes to tell HTTP/1
//! from HTTP/2, and a client that never sends any would wait there outside hyper's header timer.

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tower_http::add_extension::AddExtension;

/// One accepted HTTP/1.1 connection, serving the router.
type Connection = hyper::server::conn::http1::Connection<
    TokioIo<tokio::net::TcpStream>,
    TowerToHyperService<AddExtension<Router, ConnectInfo<SocketAddr>>>,
>;

/// The server's connection limits, from `server.*`.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Open connections at most; further clients wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, on a new connection and between requests on a
    /// kept-alive one (hyper starts the timer whenever it waits for a request head).
    pub header_read_timeout: Duration,
    /// How long a stop waits for open connections before leaving them.
    pub drain: Duration,
}

/// Serves `router` on `listener` until `stop` turns true, then stops accepting, lets answers in
/// flight finish (closing idle connections at once) for up to `limits.drain`, and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    mut stop: watch::Receiver<bool>,
) {
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        // A slot first, then the connection: beyond the limit, clients wait in the kernel's backlog,
        // and every slow or idle connection frees its slot within the header-read time limit.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !is_connection_error(&e) {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::error!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        // The peer's address, for the rare handler that records who asked (a recording link opened).
        let service =
            TowerToHyperService::new(AddExtension::new(router.clone(), ConnectInfo(peer)));
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(serve_connection(conn, slot, stop.clone()));
    }
    drop(listener);
    // Every slot back means every connection is closed.
    let drained = tokio::time::timeout(limits.drain, slots.acquire_many(max as u32)).await;
    if drained.is_err() {
        tracing::warn!(
            waited_secs = limits.drain.as_secs(),
            "stopping with connections still open"
        );
    }
}

/// Serves one connection while it holds `slot`; on stop, lets the answer in flight finish.
async fn serve_connection(
    conn: Connection,
    slot: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let _slot = slot;
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => {
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error while stopping");
            }
        }
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here: it must not be held across an await.
    let _ = stop.wait_for(|s| *s).await;
}

/// Errors about one connection that the listener survives (the client left before we accepted it).
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
