//! Acknowledgement by the call's keypress (`/exotel/ack`): Exotel's Passthru after the outbound flow's
//! Gather. A message's link acknowledges through `http::ack`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::{ExotelParams, Webhook};
use crate::app::ack::{self, event};
use crate::app::durable::{self, Written};
use crate::domain::{mask, DeliveryState};
use crate::error::AppError;
use crate::http::edge::Deadline;
use crate::http::AppState;

/// 302: Exotel's flow takes the branch that can repeat the menu.
fn again(why: &str) -> Response {
    (StatusCode::FOUND, format!("not acknowledged: {why}")).into_response()
}

/// The keypress's Passthru.
pub struct Keypress;

impl Webhook for Keypress {
    const BODY: bool = true;
    const REFUSED: &'static str = "acknowledge keypress with a missing or wrong token";
}

/// `GET` (or `POST` form) `/exotel/ack?token=`: Exotel's Passthru after the Gather, with the call's
/// `CustomField` (the delivery's greeting reference) and `digits` (quoted, as Exotel sends them). 200
/// only once the acknowledgement is committed (a repeat too); 302 for another key or none, an unknown
/// reference, or a failure to store, recorded on the delivery when it is known; 401 for a bad token.
#[tracing::instrument(skip_all, fields(delivery_id))]
pub async fn keypress(
    State(state): State<AppState>,
    deadline: Deadline,
    ExotelParams(params, _): ExotelParams<Keypress>,
) -> Result<Response, AppError> {
    let Some(reference) = params.get("CustomField").filter(|r| r.len() <= 128) else {
        tracing::warn!("acknowledge keypress without a CustomField; answering 302");
        return Ok(again("no CustomField"));
    };
    let delivery = match state.store.delivery_by_greeting_ref(&reference).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            tracing::warn!("acknowledge keypress for an unknown CustomField; answering 302");
            return Ok(again("unknown CustomField"));
        }
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "ACKNOWLEDGEMENT NOT STORED: the delivery could not be read; answering 302"
            );
            return Ok(again("could not be stored"));
        }
    };
    tracing::Span::current().record("delivery_id", delivery.id.as_str());
    let pressed = params.get("digits");
    let wanted = state.settings.ack.digit().map(str::to_owned);
    let refused = match (&wanted, pressed.as_deref()) {
        (None, _) => Some("acknowledgement by keypress is off (ack.digit is empty)".to_owned()),
        (Some(_), None) => Some("no key pressed".to_owned()),
        (Some(w), Some(p)) if w != p => Some(format!("pressed {p:?}, not the acknowledge key")),
        _ => None,
    };
    if let Some(why) = refused {
        tracing::info!(reason = %why, "keypress does not acknowledge; answering 302");
        ack::record_not_acknowledged(&state, &delivery.id, event::NOT_ACK_DIGIT, &why).await;
        return Ok(again(&why));
    }
    // The call's own record may still be on its way (outcomes are committed in groups): give it a
    // moment, so the delivery itself can become `acknowledged` rather than only the incident.
    if delivery.status == DeliveryState::Sending {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match state.store.delivery(&delivery.id).await {
                Ok(Some(d)) if d.status == DeliveryState::Sending => {}
                _ => break,
            }
        }
    }
    // Never cut off half-way once started; its 200 is left with the deadline the moment it commits.
    let budget = deadline.budget(ack::STORE_BUDGET);
    let write = {
        let (state, delivery) = (state.clone(), delivery.clone());
        async move {
            let done = ack::acknowledge(
                &state,
                &delivery.incident_id,
                Some(&delivery),
                &delivery.contact_name,
                delivery.channel.as_str(),
            )
            .await?;
            deadline.commit(acknowledged_answer());
            Ok(done)
        }
    };
    let reason = match durable::write(budget, write, |_, _| {}).await {
        Written::Ended(Ok(Some(_))) => return Ok(acknowledged_answer()),
        Written::Ended(Ok(None)) => "its incident is gone".to_owned(),
        Written::Ended(Err(e)) => e.to_string(),
        Written::Pending => format!("no answer from the database within {budget:?}"),
    };
    tracing::error!(
        error = %reason,
        phone = %mask(&delivery.phone),
        "ACKNOWLEDGEMENT NOT STORED: answering 302 so the flow can ask again"
    );
    ack::record_not_acknowledged(&state, &delivery.id, event::NOT_STORED, &reason).await;
    Ok(again("could not be stored"))
}

fn acknowledged_answer() -> Response {
    (StatusCode::OK, "acknowledged").into_response()
}
