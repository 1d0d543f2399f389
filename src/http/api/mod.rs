//! The operator API under `/api/v1`: triggers (JSON and Alertmanager), incident views, resolve, OpenAPI.
//!
//! Every route but the OpenAPI document needs `Authorization: Bearer <server.admin_token>`. Phone numbers
//! leave masked; greeting references and the raw provider requests never leave.
//!
//! One file per resource: `incidents` (create, list, get, resolve), `alertmanager` (the webhook),
//! `openapi` (the document) and `auth` (the bearer check). What they share lives here.

mod alarms;
mod alertmanager;
mod auth;
mod incidents;
mod openapi;

use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::params::{strip_json_controls, strip_raw_controls};
use super::AppState;
use crate::domain::mask;
use crate::error::AppError;

pub use alertmanager::{alertmanager, AlertmanagerAlert, AlertmanagerOutcome, AlertmanagerPayload};
pub use incidents::{
    acknowledge_incident, create_incident, get_incident, list_incidents, parse_new_incident,
    resolve_incident, AckIncidentRequest, AckOutcome, ContactSummary, DeliveryView, EscalationView,
    EventView, IncidentDetail, IncidentList, IncidentSummary, IncidentView, ListQuery,
    NewIncidentRequest, ResolveOutcome,
};
pub use openapi::{openapi_json, ApiDoc};

/// Longest emergency type accepted (the Passthru cuts at the same length).
pub const MAX_TYPE_CHARS: usize = 64;
/// Longest message accepted: it is spoken, texted and sent on WhatsApp, so it must stay short.
pub const MAX_MESSAGE_CHARS: usize = 1000;
/// Longest dedup key accepted: it is stored and indexed (unique among open incidents), so it stays short.
pub const MAX_DEDUP_KEY_CHARS: usize = 256;

/// The `/api/v1` routes; the bearer check is each handler's `Admin` argument, not a layer, so the
/// OpenAPI document stays public.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/v1/incidents",
            post(create_incident).get(list_incidents),
        )
        .route("/api/v1/incidents/{id}", get(get_incident))
        .route("/api/v1/incidents/{id}/resolve", post(resolve_incident))
        .route("/api/v1/incidents/{id}/ack", post(acknowledge_incident))
        .route("/api/v1/alertmanager", post(alertmanager))
        .route("/api/v1/alarms", get(alarms::list_alarms))
        .route("/api/v1/openapi.json", get(openapi_json))
}

/// An error answer: what is wrong and, for invalid input, which field.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub field: Option<String>,
}

/// A 422 naming the wrong field. The name is cut to 64 characters: an unknown field's name comes from
/// the request and is echoed back.
fn unprocessable(field: &str, message: impl Into<String>) -> AppError {
    AppError::Unprocessable {
        field: crate::domain::truncate(field, 64),
        message: message.into(),
    }
}

/// Incident ids are UUIDs: one with control characters names no incident, and PostgreSQL would refuse
/// it as text (a 500), so it is a 404 before any query.
fn known_id(id: &str) -> Result<(), AppError> {
    if id.chars().any(char::is_control) {
        Err(AppError::NotFound("no such incident".to_owned()))
    } else {
        Ok(())
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC; the raw number if it is out of range, so a view never
/// fails on a bad stored time.
fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Masks every spelling of `phone` in free text (provider errors may quote the number).
fn scrub(text: &str, phone: &str) -> String {
    let masked = mask(phone);
    let digits = phone.trim_start_matches('+');
    let mut out = text.replace(phone, &masked).replace(digits, &masked);
    if digits.len() > 10 {
        out = out.replace(&digits[digits.len() - 10..], &masked);
    }
    out
}

/// Parses a JSON body with every control character but tab, newline and carriage return removed, raw or
/// escaped: PostgreSQL refuses NUL in text, and a stray byte must never refuse an emergency.
fn clean_json(body: &[u8]) -> Result<Value, serde_json::Error> {
    let mut value = serde_json::from_slice::<Value>(&strip_raw_controls(body))?;
    strip_json_controls(&mut value);
    Ok(value)
}
