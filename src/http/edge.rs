//! Limits at the door: the request time limit that never turns a stored incident into a failure.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
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
        Deadline {
            at: Instant::now() + limit,
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

#[cfg(test)]
mod tests {
    use super::*;

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
