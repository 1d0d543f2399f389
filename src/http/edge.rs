//! Limits at the door: the request time limit that never turns a stored incident into a failure, the
//! share of capacity kept back for `/exotel/*`, and the cap on database use by unauthenticated reads.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::HttpBody as _;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Time kept back from a handler's budget to write its answer before the request time limit.
const ANSWER_MARGIN: Duration = Duration::from_millis(500);

/// When the current request must be answered, and the answer to give if the time limit passes after
/// the request's work was committed.
///
/// tower-http's `TimeoutLayer` drops the handler's future when the limit passes and answers 408,
/// wherever the handler was: between a commit and its answer that made a stored incident look failed,
/// and a caller retrying without a dedup key alerted everyone twice. Here the handler runs its store
/// work in a task of its own (never cut off half-way), and that task leaves its success answer in
/// `committed` the moment the commit returns; the time limit gives that answer instead of a 408.
#[derive(Clone)]
pub struct Deadline {
    at: Instant,
    committed: Arc<Mutex<Option<Response>>>,
}

impl Deadline {
    pub fn after(limit: Duration) -> Self {
        let now = Instant::now();
        Deadline {
            // A limit too large to add (a setting of years) means none; adding would panic.
            at: now
                .checked_add(limit)
                .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365)),
            committed: Arc::new(Mutex::new(None)),
        }
    }

    /// `wanted`, cut so that the handler can still answer before the request time limit.
    pub fn budget(&self, wanted: Duration) -> Duration {
        let left = self.at.saturating_duration_since(Instant::now());
        wanted.min(left.saturating_sub(ANSWER_MARGIN))
    }

    /// Records the answer owed for committed work: the time limit answers with it, not 408.
    pub fn commit(&self, answer: Response) {
        if let Ok(mut slot) = self.committed.lock() {
            *slot = Some(answer);
        }
    }

    fn take_committed(&self) -> Option<Response> {
        self.committed.lock().ok().and_then(|mut slot| slot.take())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Deadline {
    type Rejection = std::convert::Infallible;

    /// The request's deadline; a handler run without the middleware (a router-only test) gets a
    /// generous one instead of a rejection.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Deadline>()
            .cloned()
            .unwrap_or_else(|| Deadline::after(Duration::from_secs(3600))))
    }
}

/// The request time limit (`server.request_timeout_secs`): 408, unless committed work left its answer.
pub async fn deadline(State(limit): State<Duration>, mut req: Request, next: Next) -> Response {
    let deadline = Deadline::after(limit);
    req.extensions_mut().insert(deadline.clone());
    match tokio::time::timeout_at(deadline.at, next.run(req)).await {
        Ok(res) => res,
        Err(_) => match deadline.take_committed() {
            Some(res) => {
                tracing::warn!(
                    "request time limit passed after the commit; answering the stored result"
                );
                res
            }
            None => {
                tracing::warn!(limit_secs = limit.as_secs(), "request time limit passed");
                (StatusCode::REQUEST_TIMEOUT, "the request took too long").into_response()
            }
        },
    }
}

/// Shared limits, built once per router.
pub struct Limits {
    /// In-flight requests outside `/exotel/*`: `server.max_connections - server.reserved_for_exotel`.
    other_routes: Arc<Semaphore>,
    /// Concurrent database work of unauthenticated reads (`/r/…`, `/readyz`, `/metrics`).
    public_db: Arc<Semaphore>,
}

impl Limits {
    pub fn new(other_routes: usize, public_db: usize) -> Arc<Self> {
        Arc::new(Limits {
            other_routes: Arc::new(Semaphore::new(other_routes.max(1))),
            public_db: Arc::new(Semaphore::new(public_db.max(1))),
        })
    }
}

/// The public-read share, from the request (absent only in router-only tests: then no cap).
pub type PublicDb = Option<axum::Extension<Arc<Limits>>>;

/// Runs the database reads of an unauthenticated route (anyone can send them) within a small share
/// of the pool, so that a flood of them never takes the connections the Passthru needs. `None` when
/// no share frees up or the work does not finish within `wait`.
///
/// The share is held for as long as the work really runs, in a task of its own, not only while the
/// caller waits: a query given up on still holds its connection until the database answers it.
pub async fn public_read<T, F>(limits: &PublicDb, wait: Duration, work: F) -> Option<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    let deadline = Instant::now() + wait;
    let permit = match limits {
        Some(axum::Extension(l)) => Some(
            tokio::time::timeout_at(deadline, l.public_db.clone().acquire_owned())
                .await
                .ok()?
                .ok()?,
        ),
        None => None,
    };
    let task = tokio::spawn(async move {
        let _share = permit;
        work.await
    });
    tokio::time::timeout_at(deadline, task).await.ok()?.ok()
}

/// Keeps capacity back for `/exotel/*`: every other request holds a permit while it runs (and while
/// its body streams, for answers of unknown length such as event streams or downloads), and is refused
/// at once with 503 when none is left, so it can neither queue up nor hold a connection meanwhile.
///
/// `/healthz` is exempt: it answers at once without the database, and a liveness probe refused while
/// the other routes are busy would have an orchestrator restart a server that is working.
pub async fn route_budget(State(limits): State<Arc<Limits>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path.starts_with("/exotel/") || path == "/healthz" {
        return next.run(req).await;
    }
    let Ok(permit) = limits.other_routes.clone().try_acquire_owned() else {
        tracing::warn!(
            path = %req.uri().path(),
            "no capacity left outside /exotel/*; answering 503"
        );
        let mut res = (
            StatusCode::SERVICE_UNAVAILABLE,
            "busy: capacity is kept for emergency webhooks; try again",
        )
            .into_response();
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return res;
    };
    let res = next.run(req).await;
    if res.body().size_hint().exact().is_some() {
        // Fully formed already: the permit goes back now.
        return res;
    }
    // A stream: the permit goes back when the stream ends or the client leaves.
    res.map(|body| {
        use futures_util::StreamExt;
        axum::body::Body::from_stream(body.into_data_stream().map(move |chunk| {
            let _held = &permit;
            chunk
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    /// A router with one streaming route (standing in for a later event stream or download) and a
    /// Passthru, behind a budget of one request outside `/exotel/*`.
    fn budgeted() -> axum::Router {
        let limits = Limits::new(1, 1);
        axum::Router::new()
            .route(
                "/stream",
                get(|| async {
                    let chunks = futures_util::stream::pending::<
                        Result<axum::body::Bytes, std::io::Error>,
                    >();
                    Body::from_stream(chunks)
                }),
            )
            .route("/healthz", get(|| async { "ok" }))
            .route("/exotel/passthru", get(|| async { "stored" }))
            .layer(axum::middleware::from_fn_with_state(limits, route_budget))
    }

    async fn status(router: &axum::Router, path: &str) -> (StatusCode, Body) {
        let res = router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        (res.status(), res.into_body())
    }

    #[tokio::test]
    async fn a_stream_holds_its_share_until_it_ends_and_never_blocks_the_passthru() {
        let router = budgeted();
        let (first, stream) = status(&router, "/stream").await;
        assert_eq!(first, StatusCode::OK);
        // The stream is still open: the other routes' budget is spent, the Passthru's is not.
        assert_eq!(
            status(&router, "/stream").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status(&router, "/exotel/passthru").await.0, StatusCode::OK);
        assert_eq!(status(&router, "/healthz").await.0, StatusCode::OK);
        // The client leaves: the share comes back.
        drop(stream);
        let (again, _held) = status(&router, "/stream").await;
        assert_eq!(again, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_huge_limit_is_no_limit_and_no_panic() {
        let d = Deadline::after(Duration::from_secs(u64::MAX));
        assert_eq!(d.budget(Duration::from_secs(5)), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn budget_keeps_a_margin_before_the_limit() {
        let d = Deadline::after(Duration::from_secs(10));
        assert_eq!(d.budget(Duration::from_secs(5)), Duration::from_secs(5));
        let b = d.budget(Duration::from_secs(60));
        assert!(b < Duration::from_secs(10) && b > Duration::from_secs(9));
        let late = Deadline::after(Duration::from_millis(100));
        assert_eq!(late.budget(Duration::from_secs(5)), Duration::ZERO);
    }
}
