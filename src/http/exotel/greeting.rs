//! Exotel's Dynamic Greeting (`/exotel/greeting`): what an outbound call plays, read from the delivery
//! its `CustomField` names.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::token::Refused;
use super::{ExotelParams, Webhook};
use crate::http::AppState;
use crate::messages::{self, Vars};
use crate::settings::RecordingMode;
use crate::store::recordings::status;

/// The greeting must answer fast: a doctor is listening to silence meanwhile.
const GREETING_BUDGET: Duration = Duration::from_secs(3);

/// The Dynamic Greeting.
pub struct Greeting;

impl Webhook for Greeting {
    const BODY: bool = false;
    const REFUSED: &'static str =
        "greeting with a missing or wrong token; answering the generic alert";

    /// A doctor is on the line: say something useful, but reveal nothing stored.
    fn refused(state: &AppState, refused: Refused) -> Response {
        refused.log(Self::REFUSED);
        let mut response = spoken(generic(state));
        refused.mark(&mut response);
        response
    }
}

/// `GET`/`HEAD` `/exotel/greeting?CustomField=<reference>`: what the outbound call plays. Always 200 with
/// `Content-Type: text/plain` and something speakable, whatever the request holds.
#[tracing::instrument(skip_all, fields(delivery_id))]
pub async fn greeting(
    State(state): State<AppState>,
    method: Method,
    ExotelParams(params, _): ExotelParams<Greeting>,
) -> Response {
    let body = match params.get("CustomField").filter(|r| r.len() <= 128) {
        None => generic(&state),
        Some(reference) => greeting_for(&state, &method, &reference)
            .await
            .unwrap_or_else(|| generic(&state)),
    };
    spoken(body)
}

/// The generic alert: for a call whose delivery cannot be told.
fn generic(state: &AppState) -> String {
    messages::speakable(&state.settings.messages.greeting_fallback)
}

/// The 200 of a greeting.
fn spoken(body: String) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    // Exactly text/plain: Exotel asks for "nothing else", and axum would add a charset.
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
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
    if view.purpose == crate::domain::Purpose::Alarm {
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
        source: view.source.as_str(),
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
        source: view.source.as_str(),
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
            source: view.source,
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
