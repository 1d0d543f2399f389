//! Acknowledging an incident: one way in for every door (the call's keypress, a message's link, the
//! API, the CLI through the API, the console).

use super::AppState;
use crate::domain::{mask, Channel, DeliveryState};
use crate::store::{AckRequest, Acknowledged, DeliveryRow};

/// How long the keypress, the link and the API wait for the acknowledgement to commit.
pub const STORE_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

/// Delivery event kinds written for a keypress that does not acknowledge.
pub mod event {
    /// Another key, or none, was pressed.
    pub const NOT_ACK_DIGIT: &str = "ack_digit_refused";
    /// The acknowledgement could not be stored.
    pub const NOT_STORED: &str = "ack_not_stored";
}

/// Acknowledges the incident `incident_id`: by a contact through one of their deliveries (`delivery`),
/// or by an operator (`delivery` none, `via` `api`, `cli` or `console`). Counts and logs what happened
/// and wakes the dispatcher for the notices. `None` when no incident has this id.
#[tracing::instrument(skip_all, fields(incident_id = %incident_id, via = %via))]
pub async fn acknowledge(
    state: &AppState,
    incident_id: &str,
    delivery: Option<&DeliveryRow>,
    by: &str,
    via: &str,
) -> anyhow::Result<Option<Acknowledged>> {
    let notice_lanes = [Channel::Sms, Channel::Whatsapp]
        .into_iter()
        .filter_map(|c| state.providers.for_channel(c).map(|l| (c, l.name.clone())))
        .collect();
    let req = AckRequest {
        incident_id: incident_id.to_owned(),
        delivery_id: delivery.map(|d| d.id.clone()),
        by: by.to_owned(),
        via: via.to_owned(),
        notice_lanes,
    };
    let done = state.store.acknowledge(&req).await?;
    let Some(ack) = &done else {
        return Ok(done);
    };
    if let (Some((channel, from)), Some(d)) = (ack.delivery_moved, delivery) {
        state
            .metrics
            .delivery_moved(channel, from, DeliveryState::Acknowledged, true);
        tracing::info!(
            delivery_id = %d.id,
            phone = %mask(&d.phone),
            "delivery acknowledged"
        );
    }
    for m in &ack.cancelled {
        state
            .metrics
            .delivery_moved(m.channel, DeliveryState::Queued, m.status, true);
    }
    if ack.first {
        tracing::info!(
            by,
            cancelled = ack.cancelled.len(),
            notices = ack.notices,
            "incident acknowledged"
        );
        if ack.notices > 0 {
            state.wake.notify_one();
        }
        state.console.poke();
    } else {
        tracing::info!(
            by,
            status = %ack.status,
            first_by = ack.by.as_deref().unwrap_or(""),
            "acknowledged again: recorded, not broadcast"
        );
    }
    Ok(done)
}

/// Records on the delivery's events, best effort, why a keypress or a link did not acknowledge (the
/// store may be what failed).
pub async fn record_not_acknowledged(
    state: &AppState,
    delivery_id: &str,
    kind: &str,
    detail: &str,
) {
    if let Err(e) = state
        .store
        .record_event(delivery_id, kind, None, detail)
        .await
    {
        tracing::warn!(
            error = format!("{e:#}"),
            "could not record the refused keypress"
        );
    }
}
