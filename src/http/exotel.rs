//! Exotel's webhooks: the Passthru that stores an emergency and the Dynamic Greeting that plays it.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::edge::Deadline;
use super::exotel_token;
use super::params::{exotel_time, http_url, Params};
use super::AppState;
use crate::app::durable::{self, Late, WriteError, Written};
use crate::app::incidents::{self, Emergency, Planned};
use crate::domain::{mask, mask_numbers, truncate, CallSid, Phone, Source};
use crate::error::AppError;
use crate::messages::{self, Vars};
use crate::settings::RecordingMode;
use crate::store::recordings::status;

/// How long the Passthru waits for the database before answering 302, so the caller on the line is
/// moved to the flow's fallback branch instead of waiting on a stuck disk.
const STORE_BUDGET: Duration = Duration::from_secs(5);
/// The greeting must answer fast: a doctor is listening to silence meanwhile.
const GREETING_BUDGET: Duration = Duration::from_secs(3);
/// Longest emergency type label kept.
const MAX_TYPE_CHARS: usize = 64;

/// `GET` (or `POST` form) `/exotel/passthru`: stores the incident and its queued deliveries in one
/// transaction, then answers 200. Never calls a provider.
#[tracing::instrument(skip_all, fields(call_sid, incident_id))]
pub async fn passthru(
    State(state): State<AppState>,
    deadline: Deadline,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let mut params = Params::from_query(uri.query());
    params
        .extend_body(&headers, body)
        .await
        .map_err(AppError::BadRequest)?;
    if let Err(refused) = exotel_token::check(&state, &params) {
        return Ok(refused.answer("passthru with a missing or wrong token"));
    }
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

/// The greeting of the delivery `reference` names, or `None` (the caller answers the generic alert)
/// when it is unknown or cannot be read in time.
async fn greeting_for(state: &AppState, method: &Method, reference: &str) -> Option<String> {
    let view = match tokio::time::timeout(GREETING_BUDGET, state.store.greeting(reference)).await {
        Ok(Ok(Some(view))) => view,
        Ok(Ok(None)) => {
            tracing::warn!("greeting for an unknown reference; answering the generic alert");
            return None;
        }
        Ok(Err(e)) => {
            tracing::error!(
                error = format!("{e:#}"),
                "greeting lookup failed; generic alert"
            );
            return None;
        }
        Err(_) => {
            tracing::error!("greeting lookup timed out; generic alert");
            return None;
        }
    };
    tracing::Span::current().record("delivery_id", view.delivery_id.as_str());
    if view.purpose == crate::store::alarms::ALARM {
        return Some(alarm_greeting(state, method, &view));
    }
    let settings = &state.settings;
    let msg = &settings.messages;
    if view.escalating() && view.acknowledged_at.is_some() {
        return Some(acknowledged_greeting(state, method, &view));
    }
    let proxied = settings.recording_mode() == RecordingMode::Proxy;
    // In proxy mode, with a recording we fetch: our own link once it is in, text until then (a URL
    // that cannot play yet would leave the doctor listening to nothing).
    let fetched = view.recording_status.as_deref().filter(|_| proxied);
    let vars = Vars {
        emergency_type: &view.emergency_type,
        source: &view.source,
        caller: view.caller.as_deref(),
        time_ms: view.occurred_at.unwrap_or(view.received_at),
        recording: if fetched.is_some() {
            None
        } else {
            view.recording_url.as_deref()
        },
        message: view.message.as_deref(),
        incident: &view.incident_id,
        ..Vars::default()
    };
    let (body, played) = match fetched {
        Some(status::STORED) => {
            let link = format!(
                "{}/r/{}",
                settings.public_base(),
                view.link_ref.as_deref().unwrap_or_default()
            );
            (messages::greeting_body(msg, Some(&link), &vars), Some(true))
        }
        // The promise of the recording only when a follow-up call will keep it.
        Some(status::PENDING) => (
            messages::greeting_spoken(
                msg,
                &vars,
                settings
                    .recordings
                    .followup_call
                    .then_some(msg.greeting_recording_pending.as_str()),
            ),
            Some(false),
        ),
        // Unavailable or deleted: the text alone.
        Some(_) => (messages::greeting_spoken(msg, &vars, None), None),
        None => (
            messages::greeting_body(msg, view.recording_url.as_deref(), &vars),
            None,
        ),
    };
    if method == Method::GET {
        record_play(state, &view.delivery_id, played);
    }
    Some(body)
}

/// A later tier's call or a redial answered after someone acknowledged: the call was placed in the
/// moment the acknowledgement was stored, so whoever answers hears who has it in hand rather than an
/// alert that asks for them. The keypress still acknowledges (recorded, not broadcast).
fn acknowledged_greeting(
    state: &AppState,
    method: &Method,
    view: &crate::store::GreetingView,
) -> String {
    let msg = &state.settings.messages;
    let vars = Vars {
        emergency_type: &view.emergency_type,
        source: &view.source,
        caller: view.caller.as_deref(),
        time_ms: view.occurred_at.unwrap_or(view.received_at),
        message: view.message.as_deref(),
        incident: &view.incident_id,
        by: view.acknowledged_by.as_deref(),
        ack_time_ms: view.acknowledged_at,
        ..Vars::default()
    };
    let body = messages::greeting_template(msg, &msg.greeting_acknowledged, &vars);
    if method == Method::GET {
        record_play(state, &view.delivery_id, None);
    }
    body
}

/// Records that the greeting of `delivery_id` was fetched, beside the answer rather than before it:
/// a doctor is listening to silence until the greeting returns, and a busy writer must not add to it.
fn record_play(state: &AppState, delivery_id: &str, played: Option<bool>) {
    let store = state.store.clone();
    let delivery_id = delivery_id.to_owned();
    tokio::spawn(
        async move {
            if let Err(e) = store.record_greeting_play(&delivery_id, played).await {
                tracing::error!(
                    error = format!("{e:#}"),
                    "could not record the greeting play"
                );
            }
        }
        .in_current_span(),
    );
}

/// An alarm call speaks the alarm (nobody acknowledged; a provider refusing the account) and the key
/// that acknowledges: its keypress acknowledges the incident like any call's.
fn alarm_greeting(state: &AppState, method: &Method, view: &crate::store::GreetingView) -> String {
    let body = messages::alarm::spoken(
        &messages::alarm::AlarmFacts {
            source: &view.source,
            emergency_type: &view.emergency_type,
            received_at: view.received_at,
            message: view.message.as_deref(),
        },
        state.settings.ack.digit(),
        state.settings.messages.utc_offset_minutes,
    );
    if method == Method::GET {
        record_play(state, &view.delivery_id, None);
    }
    body
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
            .and_then(|t| crate::recordings::fetch::parse_available_by(&t, offset)),
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
pub async fn passthru_probe(State(state): State<AppState>, uri: Uri) -> Response {
    let params = Params::from_query(uri.query());
    if let Err(refused) = exotel_token::check(&state, &params) {
        return refused.answer("passthru probe with a missing or wrong token");
    }
    StatusCode::OK.into_response()
}

/// `GET`/`HEAD` `/exotel/greeting?CustomField=<reference>`: what the outbound call plays. Always 200 with
/// `Content-Type: text/plain` and something speakable, whatever the request holds.
#[tracing::instrument(skip_all, fields(delivery_id))]
pub async fn greeting(State(state): State<AppState>, method: Method, uri: Uri) -> Response {
    let params = Params::from_query(uri.query());
    let msg = &state.settings.messages;
    let fallback = || messages::speakable(&msg.greeting_fallback);

    let refused = exotel_token::check(&state, &params).err();
    let body = if let Some(refused) = refused {
        // A doctor is on the line: say something useful, but reveal nothing stored.
        refused.log("greeting with a missing or wrong token; answering the generic alert");
        fallback()
    } else {
        match params.get("CustomField").filter(|r| r.len() <= 128) {
            None => fallback(),
            Some(reference) => greeting_for(&state, &method, &reference)
                .await
                .unwrap_or_else(fallback),
        }
    };
    let mut response = (StatusCode::OK, body).into_response();
    if let Some(refused) = refused {
        refused.mark(&mut response);
    }
    // Exactly text/plain: Exotel asks for "nothing else", and axum would add a charset.
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
