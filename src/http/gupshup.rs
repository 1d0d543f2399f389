//! GupShup's WhatsApp delivery reports (`/gupshup/dlr`), read into provider-neutral reports by the
//! provider module, matched by provider id, idempotent, never a step back.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use super::params::{strip_json_controls, strip_raw_controls, Params};
use super::AppState;
use crate::app::reports;
use crate::domain::{mask_numbers, Channel, Report};
use crate::error::AppError;
use crate::providers::gupshup;
use crate::store::CallbackEffect;

/// `/gupshup/dlr`. GupShup's token is not Exotel's concern: a wrong one raises no token alarm.
pub fn routes() -> Router<AppState> {
    Router::new().route("/gupshup/dlr", post(dlr))
}

/// GupShup sends JSON, sometimes labelled as a form: the body, not its content type, decides.
fn looks_json(body: &[u8]) -> bool {
    body.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[' || *b == b'{')
}

/// The reports in a GupShup delivery-report body: a JSON array or object (whatever the content type
/// says, as long as the body looks like JSON), else a form of one report's fields.
fn read_reports(body: &Bytes, form: &Params) -> Result<Vec<Report>, AppError> {
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
pub async fn dlr(
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
    let reports = read_reports(&body, &params)?;
    tracing::Span::current().record("reports", reports.len());
    if reports.is_empty() {
        return Err(AppError::BadRequest(
            "no delivery report with an externalId".to_owned(),
        ));
    }
    let (mut known, mut pending, mut lines) = (0, 0, Vec::new());
    for report in &reports {
        // One wait per batch: once an item has waited in vain, the rest are tried once each, so a
        // batch never outlasts the request time limit.
        let effect = reports::apply(&state, report, pending == 0).await?;
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
