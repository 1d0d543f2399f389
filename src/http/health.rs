//! What orchestrators and Prometheus read: `/readyz` (can this replica do its job?) and `/metrics`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::edge::PublicDb;
use super::AppState;
use crate::domain::{now_ms, Channel};
use crate::metrics::{CLASSIC_CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE};

/// A readiness probe must answer before the orchestrator's own timeout, even with a hung database.
const DB_CHECK_BUDGET: Duration = Duration::from_secs(2);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

#[derive(Debug, Serialize)]
struct Readiness {
    ready: bool,
    /// `ok`, `unreachable` or `timeout`.
    database: &'static str,
    /// `ok`, `pending` or `unknown` (when the database cannot be read).
    migrations: &'static str,
    dispatcher: DispatcherState,
    /// `live` or `dry-run`, per channel.
    channels: std::collections::BTreeMap<&'static str, &'static str>,
}

#[derive(Debug, Serialize)]
struct DispatcherState {
    /// False on a webhook-only replica (`dispatch.enabled = false`): its readiness does not wait for it.
    enabled: bool,
    alive: bool,
    /// Seconds since the dispatcher loop last went round; absent when it never has.
    last_heartbeat_age_secs: Option<f64>,
    stale_after_secs: u64,
}

/// `GET /readyz`: 200 when the database answers and is migrated and the dispatcher loop is alive; 503
/// otherwise. The body says which part failed, and which channels are live or dry-run.
async fn readyz(State(state): State<AppState>, limits: PublicDb) -> Response {
    // Anyone can ask: a share of the database, so a flood of probes cannot take the Passthru's.
    let permit = match &limits {
        Some(l) => match l.public_db(DB_CHECK_BUDGET).await {
            Some(p) => Some(p),
            None => return not_ready_busy(),
        },
        None => None,
    };
    let (database, migrations) = match tokio::time::timeout(DB_CHECK_BUDGET, state.store.ping())
        .await
    {
        Ok(Ok(())) => {
            let migrated = tokio::time::timeout(DB_CHECK_BUDGET, state.store.is_migrated()).await;
            let m = match migrated {
                Ok(Ok(true)) => "ok",
                Ok(Ok(false)) => "pending",
                _ => "unknown",
            };
            ("ok", m)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = format!("{e:#}"), "readyz: database unreachable");
            ("unreachable", "unknown")
        }
        Err(_) => ("timeout", "unknown"),
    };
    drop(permit);
    let stale_after_secs = state.settings.readyz.heartbeat_stale_secs;
    let beat = state.dispatcher_heartbeat.load(Ordering::Relaxed);
    // 0 means the loop has not started yet: not ready, so traffic waits for a replica that can send.
    let age_ms = (beat > 0).then(|| (now_ms() - beat).max(0));
    let alive = age_ms.is_some_and(|a| a <= (stale_after_secs as i64).saturating_mul(1000));
    let channels = Channel::ALL
        .iter()
        .map(|&c| {
            let mode = if state.settings.channel_live(c) {
                "live"
            } else {
                "dry-run"
            };
            (c.as_str(), mode)
        })
        .collect();
    let enabled = state.settings.dispatch.enabled;
    let ready = database == "ok" && migrations == "ok" && (alive || !enabled);
    let body = Readiness {
        ready,
        database,
        migrations,
        dispatcher: DispatcherState {
            enabled,
            alive,
            last_heartbeat_age_secs: age_ms.map(|a| a as f64 / 1000.0),
            stale_after_secs,
        },
        channels,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Too many probes at once: not ready now (the orchestrator asks again).
fn not_ready_busy() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({"ready": false, "database": "busy"})),
    )
        .into_response()
}

/// `GET /metrics`: the Prometheus exposition, OpenMetrics when the scraper asks for it (Prometheus does),
/// else the classic text format. The queue gauges are read from the store now; when it cannot be read
/// they keep their last values and the rest is still served.
async fn metrics(State(state): State<AppState>, limits: PublicDb, headers: HeaderMap) -> Response {
    // Unauthenticated: the queue figures take a share of the database only when one is free; otherwise
    // the last figures are served.
    let permit = match &limits {
        Some(l) => l.public_db(DB_CHECK_BUDGET).await.map(Some),
        None => Some(None),
    };
    match permit {
        Some(_permit) => {
            match tokio::time::timeout(DB_CHECK_BUDGET, state.store.queue_stats()).await {
                Ok(Ok(stats)) => state.metrics.set_queue(stats, now_ms()),
                Ok(Err(e)) => tracing::warn!(
                    error = format!("{e:#}"),
                    "metrics: queue figures unavailable"
                ),
                Err(_) => tracing::warn!("metrics: queue figures timed out"),
            }
        }
        None => tracing::warn!("metrics: database share busy; serving the last queue figures"),
    }
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let (encoded, content_type) = if openmetrics {
        (state.metrics.encode(), OPENMETRICS_CONTENT_TYPE)
    } else {
        (state.metrics.encode_classic(), CLASSIC_CONTENT_TYPE)
    };
    match encoded {
        Ok(text) => {
            let mut res = (StatusCode::OK, text).into_response();
            res.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            res
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics").into_response(),
    }
}

/// Counts every answered request by matched route pattern and status. The pattern, not the URI: URIs
/// carry ids and tokens, and would grow the label set without bound.
pub async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let res = next.run(req).await;
    state
        .metrics
        .webhook_request(&endpoint, res.status().as_u16());
    res
}
