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

use super::edge::{public_read, PublicDb};
use super::exotel::token::NotExotel;
use super::AppState;
use crate::domain::{now_ms, Channel};
use crate::metrics::{CLASSIC_CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE};
use crate::store::Writable;

/// A readiness probe must answer before the orchestrator's own timeout, even with a hung database.
const DB_CHECK_BUDGET: Duration = Duration::from_secs(2);
/// The `status` label of a stranger's request refused for its token (see [`count_requests`]).
pub const NOT_EXOTEL: &str = "not_exotel";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

#[derive(Debug, Serialize)]
struct Readiness {
    ready: bool,
    /// `ok`; `degraded` while an account alarm is open (a provider refuses the account, or a burst of
    /// bad webhook tokens): still ready, since taking the only replica out of its load balancer would
    /// lose the emergencies it can still store, but every later alert on that lane fails; `not_ready`.
    status: &'static str,
    /// The open account alarms (lane or provider account, reason, when raised; not the provider's
    /// words, which only `GET /api/v1/alarms` shows); empty when none.
    degraded: Vec<crate::store::alarms::OpenAccountAlarm>,
    /// `ok`, `unreachable`, `timeout`, or `unwritable` (it answers reads but its commits fail: a full
    /// disk, a read-only file; every Passthru is answered 302 meanwhile).
    database: &'static str,
    /// Why writes fail, and since when (ms since the epoch); absent while they commit.
    #[serde(skip_serializing_if = "Option::is_none")]
    unwritable: Option<Unwritable>,
    /// `ok`, `pending` or `unknown` (when the database cannot be read).
    migrations: &'static str,
    dispatcher: DispatcherState,
    /// `live` or `dry-run`, per channel.
    channels: std::collections::BTreeMap<&'static str, &'static str>,
    /// What the auditor last found stalled. A stall does not make this replica unready: taking it out
    /// of the load balancer would not move the work, and would refuse the next emergency.
    auditor: crate::app::auditor::StatusView,
    /// Requests to Exotel's webhooks this process refused for their token that did not look like
    /// Exotel's for this account (scanners): reported, not a reason to degrade, since nothing is
    /// refused that Exotel sent.
    webhook_scanners: crate::app::alarms::StrangersView,
}

#[derive(Debug, Serialize)]
struct Unwritable {
    since_ms: i64,
    error: String,
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

/// `GET /healthz`: liveness. 503 once an enabled dispatcher has stopped on its own: nothing would be
/// sent any more, and only a restart helps (the process also exits non-zero by itself). A database
/// outage does not fail it: a restart cannot fix that, and the webhooks keep answering 302 meanwhile.
pub async fn healthz(State(state): State<AppState>) -> Response {
    if state.dispatcher_dead.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "dispatcher stopped: nothing is being sent; restart this process",
        )
            .into_response();
    }
    (StatusCode::OK, "ok").into_response()
}

/// `GET /readyz`: 200 when the database answers and is migrated and the dispatcher loop is alive; 503
/// otherwise. The body says which part failed, which channels are live or dry-run, and what the auditor
/// last found stalled (`auditor.stalled`, `auditor.stalls`; reported, not a reason for 503).
async fn readyz(State(state): State<AppState>, limits: PublicDb) -> Response {
    // Anyone can ask: the reads run within the unauthenticated share of the database, so a flood of
    // probes cannot take the Passthru's connections. No time limit inside: a query given up on would
    // still hold its connection; the share is held until the database answers.
    let store = state.store.clone();
    let checked = public_read(&limits, DB_CHECK_BUDGET * 2, async move {
        match store.ping().await {
            Ok(()) => {
                let migrations = match store.is_migrated().await {
                    Ok(true) => "ok",
                    Ok(false) => "pending",
                    Err(_) => "unknown",
                };
                // Unreadable (e.g. migrations pending): not degraded by what cannot be seen.
                let degraded = store.open_account_alarms().await.unwrap_or_default();
                let writable = store.writable().await;
                let (database, unwritable) = match writable {
                    Writable::Yes => ("ok", None),
                    Writable::No { since_ms, error } => {
                        ("unwritable", Some(Unwritable { since_ms, error }))
                    }
                };
                (database, unwritable, migrations, degraded)
            }
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "readyz: database unreachable");
                ("unreachable", None, "unknown", Vec::new())
            }
        }
    })
    .await;
    // No share free in time, or no answer in time.
    let (database, unwritable, migrations, degraded) =
        checked.unwrap_or(("timeout", None, "unknown", Vec::new()));
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
        status: match (ready, degraded.is_empty()) {
            (false, _) => "not_ready",
            (true, true) => "ok",
            (true, false) => "degraded",
        },
        degraded,
        database,
        unwritable,
        migrations,
        dispatcher: DispatcherState {
            enabled,
            alive,
            last_heartbeat_age_secs: age_ms.map(|a| a as f64 / 1000.0),
            stale_after_secs,
        },
        channels,
        auditor: state.auditor.view(state.settings.auditor.every(), now_ms()),
        webhook_scanners: state.alarm_watch.strangers(),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: the Prometheus exposition, OpenMetrics when the scraper asks for it (Prometheus does),
/// else the classic text format. The queue gauges are read from the store now; when it cannot be read
/// they keep their last values and the rest is still served.
async fn metrics(State(state): State<AppState>, limits: PublicDb, headers: HeaderMap) -> Response {
    // Unauthenticated: the queue figures are read within the unauthenticated share of the database;
    // when none is free or the read is slow, the last figures are served.
    let store = state.store.clone();
    match public_read(&limits, DB_CHECK_BUDGET, async move {
        store.queue_stats().await
    })
    .await
    {
        Some(Ok(stats)) => state.metrics.set_queue(stats, state.store.now_ms()),
        Some(Err(e)) => tracing::warn!(
            error = format!("{e:#}"),
            "metrics: queue figures unavailable"
        ),
        None => tracing::warn!("metrics: queue figures busy or timed out; serving the last ones"),
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
/// carry ids and tokens, and would grow the label set without bound. A request to Exotel's webhooks
/// refused for its token that does not look like Exotel's (a scanner) is counted as `not_exotel`, so
/// that a rise in `401` means Exotel itself is being refused.
pub async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let res = next.run(req).await;
    let status = if res.extensions().get::<NotExotel>().is_some() {
        NOT_EXOTEL.to_owned()
    } else {
        res.status().as_u16().to_string()
    };
    state.metrics.webhook_request(&endpoint, &status);
    res
}
