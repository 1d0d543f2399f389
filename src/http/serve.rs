//! The HTTP/1.1 server loop: a connection limit and a header-read time limit, so slow or idle clients
//! cannot starve the Passthru, and a graceful stop that lets answers in flight finish.
//!
//! `axum::serve` has neither limit. hyper's own http1 connection builder is used directly, not
//! hyper-util's `auto` builder: that one first waits for the client's opening bytes to tell HTTP/1
//! from HTTP/2, and a client that never sends any would wait there outside hyper's header timer.
//!
//! The limit alone would let one client hold every connection open with cheap keep-alive requests
//! (`/healthz` every few seconds, well inside the header-read limit), and the next Passthru would wait
//! in the kernel's backlog for as long as that client likes. So at the limit, before waiting for a
//! connection to close, the server closes an idle one (no request in flight): of the client (address)
//! holding the most connections, the oldest. A connection busy with a request is never cut, and a client
//! with one connection loses it only when every other client holds no more than one either.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use axum::Router;
use futures_util::future::BoxFuture;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tower_http::add_extension::AddExtension;

/// One accepted HTTP/1.1 connection, serving the router.
type Connection = hyper::server::conn::http1::Connection<
    TokioIo<tokio::net::TcpStream>,
    TowerToHyperService<Counted<AddExtension<Router, ConnectInfo<SocketAddr>>>>,
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
    let open = Arc::new(Open::default());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        // A slot first, then the connection: beyond the limit, clients wait in the kernel's backlog,
        // and every slow or idle connection frees its slot within the header-read time limit. At the
        // limit an idle kept-alive connection is closed first, so the next client waits for nothing.
        if slots.available_permits() == 0 {
            open.close_one_idle();
        }
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
        let (entry, registered) = open.add(peer.ip());
        let service = TowerToHyperService::new(Counted {
            inner: AddExtension::new(router.clone(), ConnectInfo(peer)),
            busy: entry.busy.clone(),
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(serve_connection(
            conn,
            (slot, registered),
            entry.close,
            stop.clone(),
        ));
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

/// Serves one connection while it holds `slot`; on stop, or when closed to make room, lets the answer
/// in flight finish.
async fn serve_connection(
    conn: Connection,
    held: (OwnedSemaphorePermit, Registered),
    close: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let _held = held;
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => {
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        _ = stopped(&mut stop) => {}
        _ = close.notified() => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended with an error while closing");
    }
}

/// The open connections: whose they are, since when, and whether a request is in flight on them.
#[derive(Default)]
struct Open {
    conns: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicUsize,
    /// When the limit was last reported (ms since the epoch), so a flood logs once a minute.
    warned_at: AtomicI64,
}

/// One open connection's record.
#[derive(Clone)]
struct Entry {
    id: u64,
    ip: IpAddr,
    opened: Instant,
    /// Requests in flight (a response counts until its body has been sent or dropped).
    busy: Arc<AtomicUsize>,
    /// Told to close once the request in flight, if any, is answered.
    close: Arc<Notify>,
}

impl Open {
    fn add(self: &Arc<Self>, ip: IpAddr) -> (Entry, Registered) {
        let entry = Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) as u64,
            ip,
            opened: Instant::now(),
            busy: Arc::new(AtomicUsize::new(0)),
            close: Arc::new(Notify::new()),
        };
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(entry.id, entry.clone());
        }
        let registered = Registered {
            id: entry.id,
            open: Arc::downgrade(self),
        };
        (entry, registered)
    }

    /// Closes one idle connection: of the address holding the most, the oldest. False when every
    /// connection has a request in flight.
    fn close_one_idle(&self) -> bool {
        let Ok(mut conns) = self.conns.lock() else {
            return false;
        };
        let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
        for e in conns.values() {
            *per_ip.entry(e.ip).or_default() += 1;
        }
        let victim = conns
            .values()
            .filter(|e| e.busy.load(Ordering::Acquire) == 0)
            .max_by(|a, b| {
                per_ip[&a.ip]
                    .cmp(&per_ip[&b.ip])
                    .then_with(|| b.opened.cmp(&a.opened))
            })
            .map(|e| (e.id, e.ip, per_ip[&e.ip]));
        let Some((id, ip, held)) = victim else {
            return false;
        };
        if let Some(e) = conns.remove(&id) {
            // `notify_one` keeps the wake-up for a task not waiting yet.
            e.close.notify_one();
        }
        let now = crate::domain::now_ms();
        let last = self.warned_at.load(Ordering::Relaxed);
        if now - last >= 60_000
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                open = conns.len() + 1,
                client = %ip,
                held,
                "at server.max_connections: closing idle kept-alive connections, those of the client holding the most first (reported once a minute)"
            );
        }
        true
    }
}

/// Held by a connection's task: its going takes the connection's record out of [`Open`].
struct Registered {
    id: u64,
    open: std::sync::Weak<Open>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(open) = self.open.upgrade() {
            if let Ok(mut conns) = open.conns.lock() {
                conns.remove(&self.id);
            }
        }
    }
}

/// A connection's service, counting its requests in flight until each response's body is done.
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    busy: Arc<AtomicUsize>,
}

/// One request in flight; dropped with its response's body.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, B> tower::Service<Request<B>> for Counted<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.busy.fetch_add(1, Ordering::AcqRel);
        let in_flight = InFlight(self.busy.clone());
        let answer = self.inner.call(req);
        Box::pin(async move {
            let res = answer.await?;
            Ok(res.map(|body| {
                Body::new(http_body_util::BodyExt::map_frame(body, move |frame| {
                    let _in_flight = &in_flight;
                    frame
                }))
            }))
        })
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
