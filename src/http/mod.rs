//! The HTTP surface: router, shared state and the layers every request passes through.

pub mod ack;
pub mod api;
pub mod console;
pub mod edge;
pub mod exotel;
pub mod gupshup;
pub mod health;
pub mod params;
pub mod recording;
pub mod serve;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use crate::app::{token_matches, AppState};

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    let settings = &state.settings.server;
    let timeout = Duration::from_secs(settings.request_timeout_secs);
    let max_body = settings.max_body_bytes;
    let max_uri = settings.max_uri_bytes;
    let limits = edge::Limits::new(
        settings
            .max_connections
            .saturating_sub(settings.reserved_for_exotel),
        settings.public_db_concurrency,
    );

    Router::new()
        .merge(exotel::routes())
        .route(
            "/a/{reference}",
            get(ack::link_page).post(ack::link_confirm),
        )
        .route(
            "/r/{reference}",
            get(recording::recording).head(recording::recording),
        )
        .route("/healthz", get(health::healthz))
        .merge(gupshup::routes())
        .merge(api::routes())
        .merge(console::routes())
        .merge(health::routes())
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(max_uri, limit_uri))
        .layer(middleware::from_fn_with_state(
            // Already "said" when a proxy is trusted: then there is nothing to warn about.
            Arc::new(AtomicBool::new(
                !settings.trusted_proxies().unwrap_or_default().is_empty(),
            )),
            warn_untrusted_forwarding,
        ))
        .layer(axum::Extension(limits.clone()))
        .layer(middleware::from_fn_with_state(timeout, edge::deadline))
        .layer(middleware::from_fn_with_state(limits, edge::route_budget))
        // Outside the time limit and the budget, so their 408s and 503s are counted too.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            health::count_requests,
        ))
        // The span holds the path only: query strings carry the webhook token and phone numbers.
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let request_id = req
                .headers()
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!(
                "request",
                method = %req.method(),
                path = %req.uri().path(),
                request_id = %request_id,
            )
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .with_state(state)
}

/// Warns once (`said` turns true) when a request carries `X-Forwarded-For` and `server.trusted_proxies`
/// is empty: the server sits behind a reverse proxy it was not told about, so every client has the
/// proxy's address, and the console's sign-in limit and the recording-open records cannot tell people
/// apart. Once is enough: every request through the proxy carries the header.
async fn warn_untrusted_forwarding(
    State(said): State<Arc<AtomicBool>>,
    req: Request,
    next: Next,
) -> Response {
    if req.headers().contains_key("x-forwarded-for")
        && !said.load(Ordering::Relaxed)
        && !said.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(
            "requests arrive with X-Forwarded-For but server.trusted_proxies is empty: behind a \
             reverse proxy every client then has the proxy's address (one console sign-in limit for \
             everyone, recording opens recorded as the proxy's); set server.trusted_proxies to the \
             proxy's address"
        );
    }
    next.run(req).await
}

/// Rejects oversized URIs before any handler reads them: the Passthru GET carries its fields there.
async fn limit_uri(State(max): State<usize>, req: Request, next: Next) -> Response {
    let len = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().len())
        .unwrap_or(0);
    if len > max {
        tracing::warn!(len, max, "request URI too long");
        return (
            StatusCode::URI_TOO_LONG,
            format!("request URI is {len} bytes; the limit is {max}"),
        )
            .into_response();
    }
    next.run(req).await
}
