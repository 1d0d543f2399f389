//! Exotel's StatusCallbacks for calls and SMS, read into provider-neutral reports by the provider
//! modules, matched by provider id, idempotent, never a step back.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{ExotelParams, Webhook};
use crate::app::reports;
use crate::domain::Channel;
use crate::error::AppError;
use crate::http::AppState;
use crate::providers::exotel::{call as exotel_call, sms as exotel_sms};
use crate::store::CallbackEffect;

/// Exotel's status callbacks, of calls and SMS alike.
pub struct StatusCallback;

impl Webhook for StatusCallback {
    const BODY: bool = true;
    const REFUSED: &'static str = "status callback with a missing or wrong token";
}

fn answer(
    state: &AppState,
    channel: Channel,
    effect: CallbackEffect,
    what: &str,
) -> Result<Response, AppError> {
    if let CallbackEffect::Applied { from, to } = &effect {
        // Exotel's calls and SMS both send a report after accepting.
        state.metrics.delivery_moved(channel, *from, *to, true);
    }
    match effect {
        CallbackEffect::Applied { to: status, .. } => {
            Ok((StatusCode::OK, format!("ok: {status}")).into_response())
        }
        CallbackEffect::Ignored(why) => Ok((StatusCode::OK, format!("ok: {why}")).into_response()),
        CallbackEffect::Unknown => Err(AppError::NotFound(format!("no delivery has this {what}"))),
        // Still not on record after waiting: ask Exotel to come back; the details look-up covers it too.
        CallbackEffect::Pending => Ok((
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            "the request this reports on is still being recorded; try again",
        )
            .into_response()),
    }
}

/// `POST /exotel/call-status` (JSON, form or multipart).
#[tracing::instrument(skip_all, fields(call_sid))]
pub async fn call_status(
    State(state): State<AppState>,
    ExotelParams(p, _): ExotelParams<StatusCallback>,
) -> Result<Response, AppError> {
    let report = exotel_call::callback_report(|k| p.get(k)).map_err(AppError::BadRequest)?;
    tracing::Span::current().record("call_sid", report.provider_id.as_str());
    let effect = reports::apply(&state, &report, true).await?;
    tracing::info!(status = %report.provider_status, effect = ?effect, "call status");
    answer(&state, Channel::Call, effect, "CallSid")
}

/// `POST /exotel/sms-status` (form).
#[tracing::instrument(skip_all, fields(sms_sid))]
pub async fn sms_status(
    State(state): State<AppState>,
    ExotelParams(p, _): ExotelParams<StatusCallback>,
) -> Result<Response, AppError> {
    let report = exotel_sms::callback_report(|k| p.get(k)).map_err(AppError::BadRequest)?;
    tracing::Span::current().record("sms_sid", report.provider_id.as_str());
    if let Some(lane) = state.providers.for_channel(Channel::Sms) {
        crate::app::alarms::sms_reported(&state, &lane.name, &lane.account, &report);
    }
    let effect = reports::apply(&state, &report, true).await?;
    tracing::info!(status = %report.provider_status, effect = ?effect, "sms status");
    answer(&state, Channel::Sms, effect, "SmsSid")
}
