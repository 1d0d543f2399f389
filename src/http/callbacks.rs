//! Provider reports: Exotel's StatusCallbacks for calls and SMS and GupShup's WhatsApp delivery
//! reports, read into provider-neutral reports by the provider modules, matched by provider id,
//! idempotent, never a step back.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::exotel_token;
use super::params::{strip_json_controls, strip_raw_controls, Params};
use super::AppState;
use crate::domain::Channel;
use crate::domain::{mask_numbers, Report};
use crate::error::AppError;
use crate::providers::{exotel_call, exotel_sms, gupshup};
use crate::store::CallbackEffect;

/// The fields of one of Exotel's status callbacks, once its token is right; else the answer to give.
async fn read(
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    state: &AppState,
) -> Result<Params, Response> {
    let mut params = Params::from_query(uri.query());
    params
        .extend_body(headers, body)
        .await
        .map_err(|e| AppError::BadRequest(e).into_response())?;
    if let Err(refused) = exotel_token::check(state, &params) {
        return Err(refused.answer("status callback with a missing or wrong token"));
    }
    Ok(params)
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

/// A report can arrive before our own record of the request it reports on is committed (outcomes are
/// committed in batches): give that record a moment instead of dropping the report.
async fn until_recorded<F, Fut>(mut apply: F) -> anyhow::Result<CallbackEffect>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<CallbackEffect>>,
{
    for _ in 0..30 {
        let effect = apply().await?;
        if effect != CallbackEffect::Pending {
            return Ok(effect);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(CallbackEffect::Pending)
}

/// `POST /exotel/call-status` (JSON, form or multipart).
#[tracing::instrument(skip_all, fields(call_sid))]
pub async fn call_status(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let p = match read(&uri, &headers, body, &state).await {
        Ok(p) => p,
        Err(refused) => return Ok(refused),
    };
    let report = exotel_call::callback_report(|k| p.get(k)).map_err(AppError::BadRequest)?;
    tracing::Span::current().record("call_sid", report.provider_id.as_str());
    let policy = state.settings.redial_policy();
    let effect = until_recorded(|| state.store.apply_report(&report, policy)).await?;
    tracing::info!(status = %report.provider_status, effect = ?effect, "call status");
    answer(&state, Channel::Call, effect, "CallSid")
}

/// `POST /exotel/sms-status` (form).
#[tracing::instrument(skip_all, fields(sms_sid))]
pub async fn sms_status(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let p = match read(&uri, &headers, body, &state).await {
        Ok(p) => p,
        Err(refused) => return Ok(refused),
    };
    let report = exotel_sms::callback_report(|k| p.get(k)).map_err(AppError::BadRequest)?;
    tracing::Span::current().record("sms_sid", report.provider_id.as_str());
    if let Some(lane) = state.providers.for_channel(Channel::Sms) {
        crate::app::alarms::sms_reported(
            &state,
            &lane.name,
            &lane.account,
            &report.provider_id,
            p.get("DetailedStatusCode").as_deref(),
            p.get("Status").is_some_and(|s| s.trim() == "sent"),
        );
    }
    let policy = state.settings.redial_policy();
    let effect = until_recorded(|| state.store.apply_report(&report, policy)).await?;
    tracing::info!(status = %report.provider_status, effect = ?effect, "sms status");
    answer(&state, Channel::Sms, effect, "SmsSid")
}

fn looks_json(body: &[u8]) -> bool {
    body.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[' || *b == b'{')
}

/// The reports in a GupShup delivery-report body: a JSON array or object (whatever the content type
/// says, as long as the body looks like JSON), else a form of one report's fields.
fn gupshup_reports(body: &Bytes, form: &Params) -> Result<Vec<Report>, AppError> {
    if looks_json(body) {
        let mut value: serde_json::Value = serde_json::from_slice(&strip_raw_controls(body))
            .map_err(|e| AppError::BadRequest(format!("the body is not valid JSON: {e}")))?;
        strip_json_controls(&mut value);
        return Ok(gupshup::dlr_reports(&value));
    }
    Ok(gupshup::dlr_report(|name| form.get(name))
        .into_iter()
        .collect())
}

/// `POST /gupshup/dlr?token=`: GupShup's delivery reports, a JSON array (also one object, or a form).
/// Applied in the order given, each as a callback is; 200 when any item is ours, 404 when none is.
#[tracing::instrument(skip_all, fields(reports))]
pub async fn gupshup_dlr(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let mut params = Params::from_query(uri.query());
    if !state.webhook_token_ok(params.get("token").as_deref()) {
        tracing::warn!("delivery report with a missing or wrong token");
        return Err(AppError::Unauthorized);
    }
    if !looks_json(&body) {
        params
            .extend_body(&headers, body.clone())
            .await
            .map_err(AppError::BadRequest)?;
    }
    let reports = gupshup_reports(&body, &params)?;
    tracing::Span::current().record("reports", reports.len());
    if reports.is_empty() {
        return Err(AppError::BadRequest(
            "no delivery report with an externalId".to_owned(),
        ));
    }
    let policy = state.settings.redial_policy();
    let (mut known, mut pending, mut lines) = (0, 0, Vec::new());
    for report in &reports {
        // One wait per batch: once an item has waited in vain, the rest are tried once each, so a
        // batch never outlasts the request time limit.
        let effect = if pending == 0 {
            until_recorded(|| state.store.apply_report(report, policy)).await?
        } else {
            state.store.apply_report(report, policy).await?
        };
        match &effect {
            CallbackEffect::Applied { from, to } => {
                known += 1;
                // GupShup reports after accepting, so acceptance alone never finished it.
                state
                    .metrics
                    .delivery_moved(Channel::Whatsapp, *from, *to, true);
            }
            CallbackEffect::Ignored(_) => known += 1,
            CallbackEffect::Pending => pending += 1,
            CallbackEffect::Unknown => tracing::warn!(
                external_id = %report.provider_id,
                detail = %mask_numbers(&report.detail),
                "delivery report for no message of ours"
            ),
        }
        tracing::info!(
            external_id = %report.provider_id,
            event = %report.provider_status,
            effect = ?effect,
            "whatsapp delivery report"
        );
        let said = match effect {
            CallbackEffect::Applied { to, .. } => format!("ok: {to}"),
            CallbackEffect::Ignored(why) => format!("ok: {why}"),
            CallbackEffect::Unknown => "unknown externalId".to_owned(),
            CallbackEffect::Pending => "still being recorded".to_owned(),
        };
        lines.push(format!("{}: {said}", report.provider_id));
    }
    let text = lines.join("\n");
    // An item still waiting for our record must not be lost: the whole batch is asked for again
    // (applying a report twice changes nothing).
    if known > 0 && pending == 0 {
        return Ok((StatusCode::OK, text).into_response());
    }
    if pending > 0 {
        return Ok((
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            text,
        )
            .into_response());
    }
    Err(AppError::NotFound(
        "no message has this externalId".to_owned(),
    ))
}
