//! `GET /api/v1/alarms`: the alarms raised (nobody acknowledged an incident in time; a provider
//! refusing the account; a burst of bad webhook tokens), newest first, and whether the webhook took them.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Admin;
use super::{iso, ErrorBody};
use crate::error::AppError;
use crate::http::AppState;

/// How many alarms the list shows at most.
const LIMIT: i64 = 200;

/// One alarm.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlarmView {
    pub id: String,
    /// `unreached` or `account`.
    pub kind: String,
    /// Raised once per key: `unreached:<incident>`, `account:<lane>:<reason>`.
    pub dedup_key: String,
    /// The incident nobody acknowledged, or the one that carries an account alarm to the
    /// `[unreached]` teams.
    pub incident_id: Option<String>,
    /// The provider lane (`exotel:call`, `gupshup:whatsapp`, `webhook`) of an account alarm.
    pub lane: Option<String>,
    /// `auth`, `payment`, `credit`, `pack_expired`, `dlt_sender`, `dlt_template`, `webhook_token`.
    pub reason: Option<String>,
    pub summary: String,
    /// The webhook POST: `queued`, `sent`, `failed` (refused for good) or `recorded` (no webhook set).
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub raised_at: String,
    pub sent_at: Option<String>,
    /// An account alarm's lane succeeded again.
    pub cleared_at: Option<String>,
}

/// The alarms, newest first (at most 200).
#[utoipa::path(
    get,
    path = "/api/v1/alarms",
    tag = "incidents",
    responses(
        (status = 200, description = "The alarms, newest first", body = [AlarmView]),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_alarms(
    _admin: Admin,
    State(state): State<AppState>,
) -> Result<Json<Vec<AlarmView>>, AppError> {
    let rows = state.store.alarms(LIMIT).await?;
    Ok(Json(
        rows.into_iter()
            .map(|a| AlarmView {
                id: a.id,
                kind: a.kind,
                dedup_key: a.dedup_key,
                incident_id: a.incident_id,
                lane: a.lane,
                reason: a.reason,
                summary: a.summary,
                status: a.status,
                attempts: a.attempts,
                last_error: a.last_error,
                raised_at: iso(a.raised_at),
                sent_at: a.sent_at.map(iso),
                cleared_at: a.cleared_at.map(iso),
            })
            .collect(),
    ))
}
