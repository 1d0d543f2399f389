//! Rows read back from the store, shaped for the API and the dispatcher.

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

#[derive(Debug, Clone, Serialize)]
pub struct IncidentRow {
    pub id: String,
    pub source: String,
    pub call_sid: Option<String>,
    pub dedup_key: Option<String>,
    pub emergency_type: String,
    pub route: String,
    pub caller: Option<String>,
    pub recording_url: Option<String>,
    pub message: Option<String>,
    pub raw_params: String,
    pub status: String,
    pub occurred_at: Option<i64>,
    pub received_at: i64,
    pub resolved_at: Option<i64>,
}

impl IncidentRow {
    pub const COLUMNS: &'static str =
        "id, source, call_sid, dedup_key, emergency_type, route, caller, \
        recording_url, message, raw_params, status, occurred_at, received_at, resolved_at";

    pub fn from_row(r: &AnyRow) -> anyhow::Result<Self> {
        Ok(IncidentRow {
            id: r.try_get("id")?,
            source: r.try_get("source")?,
            call_sid: r.try_get("call_sid")?,
            dedup_key: r.try_get("dedup_key")?,
            emergency_type: r.try_get("emergency_type")?,
            route: r.try_get("route")?,
            caller: r.try_get("caller")?,
            recording_url: r.try_get("recording_url")?,
            message: r.try_get("message")?,
            raw_params: r.try_get("raw_params")?,
            status: r.try_get("status")?,
            occurred_at: r.try_get("occurred_at")?,
            received_at: r.try_get("received_at")?,
            resolved_at: r.try_get("resolved_at")?,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRow {
    pub id: String,
    pub incident_id: String,
    pub contact_name: String,
    /// Full E.164 number: needed to send. Mask before logging or showing.
    pub phone: String,
    pub channel: String,
    pub greeting_ref: String,
    pub status: String,
    pub attempts: i64,
    pub redials: i64,
    pub due_at: i64,
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
    pub provider_id: Option<String>,
    pub provider_status: Option<String>,
    pub last_error: Option<String>,
    pub last_request: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub played_at: Option<i64>,
    /// The token of the claim that holds the lease: only that claim may record the outcome.
    pub lease_token: Option<String>,
    /// When an accepted call or SMS must have its final report (looked up, then given up on).
    pub report_due_at: Option<i64>,
    /// Look-ups made since the report deadline first passed.
    pub report_checks: i64,
    /// How often the lease ran out before an outcome was recorded.
    pub lease_losses: i64,
}

impl DeliveryRow {
    pub const COLUMNS: &'static str =
        "id, incident_id, contact_name, phone, channel, greeting_ref, \
        status, attempts, redials, due_at, lease_owner, lease_until, provider_id, provider_status, \
        last_error, last_request, created_at, updated_at, finished_at, played_at, lease_token, \
        report_due_at, report_checks, lease_losses";

    pub fn from_row(r: &AnyRow) -> anyhow::Result<Self> {
        Ok(DeliveryRow {
            id: r.try_get("id")?,
            incident_id: r.try_get("incident_id")?,
            contact_name: r.try_get("contact_name")?,
            phone: r.try_get("phone")?,
            channel: r.try_get("channel")?,
            greeting_ref: r.try_get("greeting_ref")?,
            status: r.try_get("status")?,
            attempts: r.try_get("attempts")?,
            redials: r.try_get("redials")?,
            due_at: r.try_get("due_at")?,
            lease_owner: r.try_get("lease_owner")?,
            lease_until: r.try_get("lease_until")?,
            provider_id: r.try_get("provider_id")?,
            provider_status: r.try_get("provider_status")?,
            last_error: r.try_get("last_error")?,
            last_request: r.try_get("last_request")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            finished_at: r.try_get("finished_at")?,
            played_at: r.try_get("played_at")?,
            lease_token: r.try_get("lease_token")?,
            report_due_at: r.try_get("report_due_at")?,
            report_checks: r.try_get("report_checks")?,
            lease_losses: r.try_get("lease_losses")?,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub id: i64,
    pub delivery_id: String,
    pub at: i64,
    pub kind: String,
    pub provider_id: Option<String>,
    pub detail: String,
}

impl EventRow {
    pub fn from_row(r: &AnyRow) -> anyhow::Result<Self> {
        Ok(EventRow {
            id: r.try_get("id")?,
            delivery_id: r.try_get("delivery_id")?,
            at: r.try_get("at")?,
            kind: r.try_get("kind")?,
            provider_id: r.try_get("provider_id")?,
            detail: r.try_get("detail")?,
        })
    }
}

/// What a call's greeting needs to know.
#[derive(Debug, Clone)]
pub struct GreetingView {
    pub delivery_id: String,
    pub incident_id: String,
    pub source: String,
    pub emergency_type: String,
    pub recording_url: Option<String>,
    pub message: Option<String>,
    pub caller: Option<String>,
    pub occurred_at: Option<i64>,
    pub received_at: i64,
}

impl GreetingView {
    pub fn from_row(r: &AnyRow) -> anyhow::Result<Self> {
        Ok(GreetingView {
            delivery_id: r.try_get("delivery_id")?,
            incident_id: r.try_get("incident_id")?,
            source: r.try_get("source")?,
            emergency_type: r.try_get("emergency_type")?,
            recording_url: r.try_get("recording_url")?,
            message: r.try_get("message")?,
            caller: r.try_get("caller")?,
            occurred_at: r.try_get("occurred_at")?,
            received_at: r.try_get("received_at")?,
        })
    }
}
