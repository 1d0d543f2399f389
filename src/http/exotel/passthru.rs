//! Exotel's Passthru (`/exotel/passthru`): the call to the emergency number, stored as an incident
//! and its queued deliveries before the caller hears the next applet.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::{ExotelParams, Webhook};
use crate::app::durable::{self, Late, WriteError, Written};
use crate::app::incidents::{self, Emergency, Planned};
use crate::domain::{mask, mask_numbers, truncate, CallSid, Phone, Source};
use crate::error::AppError;
use crate::http::edge::Deadline;
use crate::http::params::{exotel_time, http_url, Params};
use crate::http::AppState;

/// How long the Passthru waits for the database before answering 302, so the caller on the line is
/// moved to the flow's fallback branch instead of waiting on a stuck disk.
const STORE_BUDGET: Duration = Duration::from_secs(5);
/// Longest emergency type label kept.
const MAX_TYPE_CHARS: usize = 64;

/// The Passthru that stores an emergency.
pub struct Passthru;

impl Webhook for Passthru {
    const BODY: bool = true;
    const REFUSED: &'static str = "passthru with a missing or wrong token";
}

/// The Passthru's `HEAD`: the query string alone.
pub struct Probe;

impl Webhook for Probe {
    const BODY: bool = false;
    const REFUSED: &'static str = "passthru probe with a missing or wrong token";
}

/// `GET` (or `POST` form) `/exotel/passthru`: stores the incident and its queued deliveries in one
/// transaction, then answers 200. Never calls a provider.
#[tracing::instrument(skip_all, fields(call_sid, incident_id))]
pub async fn passthru(
    State(state): State<AppState>,
    deadline: Deadline,
    ExotelParams(params, _): ExotelParams<Passthru>,
) -> Result<Response, AppError> {
    let call_sid =
        CallSid::parse(&params.get("CallSid").unwrap_or_default()).map_err(AppError::BadRequest)?;
    tracing::Span::current().record("call_sid", call_sid.as_str());

    let planned = incidents::plan(&state, emergency(&state, &params, &call_sid));
    // Stored or not, the write is never cut off half-way, and its 200 is left with the deadline the
    // moment it commits, so a stored emergency is never answered as a failure. An emergency answered
    // 302 and then stored, or not stored after all, is logged when the write ends.
    let budget = deadline.budget(STORE_BUDGET);
    let emergency_type = planned.incident.emergency_type.clone();
    let caller = planned
        .incident
        .caller
        .as_deref()
        .map(mask)
        .unwrap_or_default();
    let late = {
        let (emergency_type, caller) = (emergency_type.clone(), caller.clone());
        move |when, ended| report_late_write(when, ended, &caller, &emergency_type)
    };
    let reason = match durable::write(
        budget,
        store_passthru(state.clone(), planned, deadline),
        late,
    )
    .await
    {
        Written::Ended(Ok(created)) => return Ok(stored(&created)),
        Written::Ended(Err(e)) => e.to_string(),
        Written::Pending => {
            tracing::error!(
                error = %format!("no answer from the database within {budget:?}"),
                emergency_type = %emergency_type,
                caller = %caller,
                "EMERGENCY NOT STORED YET: answering 302 so the Exotel flow takes its \
                 fallback branch; the write goes on, and whether it stores the emergency \
                 is logged when it ends"
            );
            return Ok(fallback_branch());
        }
    };
    tracing::error!(
        error = %mask_numbers(&reason),
        emergency_type = %emergency_type,
        caller = %caller,
        stored = false,
        "EMERGENCY NOT STORED: answering 302 so the Exotel flow takes its fallback branch"
    );
    Ok(fallback_branch())
}

/// The 200 of a stored emergency.
fn stored(created: &crate::store::Created) -> Response {
    tracing::Span::current().record("incident_id", created.incident_id.as_str());
    stored_answer(&created.incident_id)
}

/// 302 sends the caller down the flow's fallback branch (e.g. straight to a human).
fn fallback_branch() -> Response {
    (
        StatusCode::FOUND,
        "could not store the emergency; take the fallback branch",
    )
        .into_response()
}

/// Logs the outcome of a Passthru's write that ended after the handler stopped waiting (it answered
/// 302, or the request was cut off: the time limit, or the client hanging up), in the request's span
/// (its CallSid), with the caller's number masked.
fn report_late_write(
    when: Late,
    ended: Result<crate::store::Created, WriteError>,
    caller: &str,
    emergency_type: &str,
) {
    let after = match when {
        Late::GaveUp => {
            "after the Passthru was answered 302 (the Exotel flow took its fallback branch)"
        }
        Late::CutOff => {
            "after its Passthru request was cut off (the request time limit, or Exotel hanging up)"
        }
    };
    match ended {
        Ok(created) => {
            tracing::Span::current().record("incident_id", created.incident_id.as_str());
            tracing::warn!(
                incident_id = %created.incident_id,
                emergency_type = %emergency_type,
                caller = %caller,
                stored = true,
                "emergency stored {after}: its alerts go out"
            );
        }
        Err(e) => tracing::error!(
            error = %mask_numbers(&e.to_string()),
            emergency_type = %emergency_type,
            caller = %caller,
            stored = false,
            "EMERGENCY NOT STORED: the write that went on {after} failed"
        ),
    }
}
/// The emergency a Passthru describes. EmergencyType wins; else the IVR digits through the `[ivr]`
/// table; else the default route. Nothing here can fail: a field that cannot be read is left out
/// (and kept in the raw parameters for audit).
fn emergency(state: &AppState, params: &Params, call_sid: &CallSid) -> Emergency {
    let routing = state.routing.current();
    let offset = state.settings.messages.utc_offset_minutes;
    let requested = params
        .get_any(&["EmergencyType", "emergency_type"])
        .map(|t| truncate(&t, MAX_TYPE_CHARS))
        .or_else(|| {
            params
                .get("digits")
                .and_then(|d| routing.type_for_digits(&d).map(str::to_owned))
        });
    let recording = params.get("RecordingUrl").and_then(|raw| {
        let url = http_url(&raw);
        if url.is_none() {
            tracing::warn!("RecordingUrl is not an http(s) URL; kept for audit, never forwarded");
        }
        url
    });
    let caller = params.get_any(&["CallFrom", "From"]).map(|raw| {
        Phone::parse(&raw, state.region())
            .map(|p| p.e164().to_owned())
            .unwrap_or_else(|_| truncate(&raw, 32))
    });
    let occurred_at = ["StartTime", "Created"]
        .iter()
        .find_map(|k| params.get(k).and_then(|t| exotel_time(&t, offset)));
    Emergency {
        source: Source::Exotel,
        call_sid: Some(call_sid.as_str().to_owned()),
        dedup_key: None,
        requested_type: requested,
        caller,
        recording_url: recording,
        recording_available_by: params
            .get("RecordingAvailableBy")
            .and_then(|t| crate::providers::exotel::call_details::parse_available_by(&t, offset)),
        message: None,
        raw_params: params.audit_json(&["token"]),
        occurred_at,
    }
}

fn stored_answer(incident_id: &str) -> Response {
    (StatusCode::OK, format!("stored {incident_id}")).into_response()
}

/// Stores a Passthru's incident and, once committed, leaves the 200 with the request's deadline.
async fn store_passthru(
    state: AppState,
    planned: Planned,
    deadline: Deadline,
) -> anyhow::Result<crate::store::Created> {
    let created = incidents::raise(&state, &planned).await?;
    deadline.commit(stored_answer(&created.incident_id));
    Ok(created)
}

/// `HEAD /exotel/passthru`: a probe, answered 200 with nothing read or written. 200 rather than 405:
/// Exotel checks applet URLs with HEAD before it GETs them (documented for the SMS applet), and uptime
/// checks do the same; a 405 would look like a broken URL, while only a GET or POST is an emergency.
pub async fn passthru_probe(_: ExotelParams<Probe>) -> StatusCode {
    StatusCode::OK
}
