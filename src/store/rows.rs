//! Rows read back from the store, shaped for the API and the dispatcher, decoded by `sqlx::FromRow`.
//! Each row type's column list is a macro, so statements are put together at compile time
//! (`concat!`), never with `format!` at run time.

use serde::Serialize;

use crate::domain::{Channel, DeliveryState, IncidentState, Purpose, Source};

/// The columns of [`IncidentRow`], in a `SELECT`.
macro_rules! incident_columns {
    () => {
        "id, source, call_sid, dedup_key, emergency_type, route, caller, recording_url, message, \
         raw_params, status, occurred_at, received_at, resolved_at, unreached_at, acknowledged_at, \
         acknowledged_by, acknowledged_via, acknowledged_delivery, escalation, unreached_due_at"
    };
}
pub(crate) use incident_columns;

/// The columns of [`DeliveryRow`], in a `SELECT` or a `RETURNING`.
macro_rules! delivery_columns {
    () => {
        "id, incident_id, contact_name, phone, channel, provider, greeting_ref, status, attempts, \
         redials, due_at, lease_owner, lease_until, provider_id, provider_status, last_error, \
         last_request, created_at, updated_at, finished_at, played_at, lease_token, report_due_at, \
         report_checks, lease_losses, link_ref, purpose, spoke_text_at, played_recording_at, ack_ref, \
         tier, run"
    };
}
pub(crate) use delivery_columns;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct IncidentRow {
    pub id: String,
    #[sqlx(try_from = "String")]
    pub source: Source,
    pub call_sid: Option<String>,
    pub dedup_key: Option<String>,
    pub emergency_type: String,
    pub route: String,
    pub caller: Option<String>,
    pub recording_url: Option<String>,
    pub message: Option<String>,
    pub raw_params: String,
    #[sqlx(try_from = "String")]
    pub status: IncidentState,
    pub occurred_at: Option<i64>,
    pub received_at: i64,
    pub resolved_at: Option<i64>,
    /// When it was found that nobody could be reached (a flag with a time, not a state).
    pub unreached_at: Option<i64>,
    /// When the first person acknowledged it.
    pub acknowledged_at: Option<i64>,
    /// Who acknowledged it: a contact's name, or the operator named by the API, CLI or console.
    pub acknowledged_by: Option<String>,
    /// How: `call` (keypress), `sms` or `whatsapp` (the message's link), `api`, `cli` or `console`.
    pub acknowledged_via: Option<String>,
    /// The delivery acknowledged through (keypress or link); none for an operator's acknowledgement.
    #[serde(skip)]
    pub acknowledged_delivery: Option<String>,
    /// The escalation policy fixed when it was stored (JSON); none for a one-tier route.
    #[serde(skip)]
    pub escalation: Option<String>,
    /// Nobody acknowledged by then: it is marked unreached.
    pub unreached_due_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: String,
    pub incident_id: String,
    pub contact_name: String,
    /// Full E.164 number: needed to send. Mask before logging or showing.
    pub phone: String,
    #[sqlx(try_from = "String")]
    pub channel: Channel,
    /// The provider lane that sends it (`exotel:call`, `gupshup:whatsapp`, …).
    pub provider: String,
    pub greeting_ref: String,
    #[sqlx(try_from = "String")]
    pub status: DeliveryState,
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
    /// This delivery's recording link reference (`/r/<link_ref>`).
    #[serde(skip)]
    pub link_ref: Option<String>,
    /// `alert`, `followup` (the one call that plays a recording that came late: never redialled),
    /// `ack_notice` (someone else acknowledged), `fallback` or `alarm`.
    #[sqlx(try_from = "String")]
    pub purpose: Purpose,
    /// When this call's greeting spoke text because the recording was not in yet.
    pub spoke_text_at: Option<i64>,
    /// When this call's greeting played the recording.
    pub played_recording_at: Option<i64>,
    /// This message's acknowledge link reference (`/a/<ack_ref>`), given when it is first claimed.
    #[serde(skip)]
    pub ack_ref: Option<String>,
    /// The escalation tier this delivery alerts (0: the first).
    pub tier: i64,
    /// The pass through the escalation policy (0: the first).
    pub run: i64,
}

impl DeliveryRow {
    /// The redial policy for this delivery: a follow-up call is one attempt, never redialled.
    pub fn redial_policy(
        &self,
        policy: crate::domain::RedialPolicy,
    ) -> crate::domain::RedialPolicy {
        if self.purpose == Purpose::Followup {
            crate::domain::RedialPolicy {
                max_redials: 0,
                ..policy
            }
        } else {
            policy
        }
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub delivery_id: String,
    pub at: i64,
    pub kind: String,
    pub provider_id: Option<String>,
    pub detail: String,
}

/// What a call's greeting needs to know.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct GreetingView {
    pub delivery_id: String,
    pub incident_id: String,
    #[sqlx(try_from = "String")]
    pub source: Source,
    pub emergency_type: String,
    pub recording_url: Option<String>,
    pub message: Option<String>,
    pub caller: Option<String>,
    pub occurred_at: Option<i64>,
    pub received_at: i64,
    pub link_ref: Option<String>,
    /// When the delivery (and so its link) was created.
    pub issued_at: i64,
    /// The fetched recording's status, when it is fetched by us (proxy mode).
    pub recording_status: Option<String>,
    /// The delivery's purpose: an `alarm` call speaks the alarm, not the alert.
    #[sqlx(try_from = "String")]
    pub purpose: Purpose,
    /// Where the call stands in the escalation: a later tier's or run's call, or a redial, is placed
    /// only while nobody has acknowledged.
    pub tier: i64,
    pub run: i64,
    pub redials: i64,
    /// Who acknowledged the incident, and when, if anyone has.
    pub acknowledged_by: Option<String>,
    pub acknowledged_at: Option<i64>,
}

impl GreetingView {
    /// A call escalation places only while the incident is unacknowledged: a later tier or run, or a
    /// redial. The first tier's first calls are the alert itself.
    pub fn escalating(&self) -> bool {
        self.tier > 0 || self.run > 0 || self.redials > 0
    }
}
