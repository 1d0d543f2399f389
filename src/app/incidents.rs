//! Raising and resolving incidents: one way in for every door (the Passthru, the API, Alertmanager and
//! the CLI through the API), one way out (the API, Alertmanager and auto-resolve).

use super::AppState;
use crate::domain::{mask, Channel, DeliveryState, Source};
use crate::store::{Created, NewDelivery, NewIncident, Resolved};

/// An emergency as a door brings it, before routing.
#[derive(Debug, Clone)]
pub struct Emergency {
    pub source: Source,
    pub call_sid: Option<String>,
    pub dedup_key: Option<String>,
    /// The emergency type asked for; unknown or missing goes to the default route.
    pub requested_type: Option<String>,
    pub caller: Option<String>,
    pub recording_url: Option<String>,
    /// When the recording is said to be ready (the Passthru's `RecordingAvailableBy`).
    pub recording_available_by: Option<i64>,
    pub message: Option<String>,
    /// Every parameter as received (secrets removed), JSON, for audit.
    pub raw_params: String,
    pub occurred_at: Option<i64>,
}

/// Why an emergency could not be planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// A drill named a contact the stakeholder file does not have.
    UnknownContact(String),
}

/// An emergency routed: the incident to store and one delivery per contact and channel, each given to
/// the provider lane that sends its channel.
#[derive(Debug, Clone)]
pub struct Planned {
    pub incident: NewIncident,
    pub deliveries: Vec<NewDelivery>,
    /// Why the recording, in proxy mode, is used as it is rather than fetched.
    pub not_fetched: Option<String>,
}

/// Routes `emergency` with the current stakeholder file and provider lanes. Never fails: an unknown
/// type goes to the default route, and a channel no provider sends is logged and left out (the
/// stakeholder file is checked against the registered channels at start, so this is a bug guard).
pub fn plan(state: &AppState, emergency: Emergency) -> Planned {
    let plan = state
        .routing
        .current()
        .plan(emergency.requested_type.as_deref());
    planned(state, emergency, plan)
}

/// A fire drill: a clearly marked test incident that reaches only the contact named `contact`, on
/// every channel they have, whatever the route. Its source is `drill`, so it is told apart from a real
/// emergency everywhere it is shown or counted.
pub fn plan_drill(
    state: &AppState,
    mut emergency: Emergency,
    contact: &str,
) -> Result<Planned, PlanError> {
    let plan = state
        .routing
        .current()
        .drill(contact)
        .ok_or_else(|| PlanError::UnknownContact(contact.to_owned()))?;
    emergency.source = Source::Drill;
    Ok(planned(state, emergency, plan))
}

/// Gives each target of `plan` to the provider lane that sends its channel, and schedules it by its
/// escalation tier: every tier and every pass of the policy is stored now, with the incident, each
/// due when its turn comes (`(run × tiers + tier) × wait` after the incident). A call goes in every
/// pass; a message goes once, in its contact's first tier. The first acknowledgement cancels what
/// has not gone out.
fn planned(state: &AppState, emergency: Emergency, plan: crate::stakeholders::Plan) -> Planned {
    // A drill reaches one contact to test their channels: never escalated, never unreached.
    let escalation = plan
        .escalation
        .as_ref()
        .filter(|_| emergency.source != Source::Drill);
    let passes = escalation.map_or(1, |p| p.repeat.saturating_add(1));
    let mut deliveries = Vec::with_capacity(plan.targets.len());
    for t in &plan.targets {
        match state.providers.for_channel(t.channel) {
            Some(lane) => {
                let runs = if t.channel == Channel::Call {
                    passes
                } else {
                    1
                };
                for run in 0..runs {
                    deliveries.push(NewDelivery {
                        contact_name: t.contact_name.clone(),
                        phone: t.phone.e164().to_owned(),
                        channel: t.channel,
                        provider: lane.name.clone(),
                        tier: t.tier,
                        run,
                        delay_ms: escalation.map_or(0, |p| p.offset_ms(run, t.tier)),
                    });
                }
            }
            None => tracing::error!(
                channel = %t.channel,
                contact = %t.contact_name,
                "no provider sends this channel; this contact is not alerted on it"
            ),
        }
    }
    // Proxy mode fetches the recording, with the incident, as a durable job; a URL we may not fetch is
    // used as it is, and why is recorded once the incident is stored.
    let (recording_fetch, not_fetched) = match emergency.recording_url.as_deref() {
        Some(url) => {
            match super::recordings::fetch_for(state, url, emergency.recording_available_by) {
                Ok(fetch) => (fetch, None),
                Err(why) => (None, Some(why)),
            }
        }
        None => (None, None),
    };
    let deadline_secs = state.settings.ack.deadline_secs();
    let unreached_after_secs = match escalation {
        Some(policy) => policy.unreached_after_secs(deadline_secs),
        None => deadline_secs,
    };
    let unreached_after_ms = (emergency.source != Source::Drill)
        .then(|| i64::try_from(unreached_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX / 2));
    // Fixed now, like the contacts: a later edit of the stakeholder file changes only new incidents.
    let escalation_json = escalation.and_then(|p| match serde_json::to_string(p) {
        Ok(json) => Some(json),
        Err(e) => {
            tracing::error!(error = %e, "cannot record the escalation policy on the incident");
            None
        }
    });
    Planned {
        not_fetched,
        incident: NewIncident {
            source: emergency.source,
            call_sid: emergency.call_sid,
            dedup_key: emergency.dedup_key,
            emergency_type: plan.emergency_type,
            route: plan.route,
            caller: emergency.caller,
            recording_url: emergency.recording_url,
            message: emergency.message,
            raw_params: emergency.raw_params,
            occurred_at: emergency.occurred_at,
            recording_fetch,
            escalation: escalation_json,
            unreached_after_ms,
        },
        deliveries,
    }
}

/// Stores a planned incident and its deliveries in one transaction (or finds the stored one: a
/// repeated CallSid, or the dedup key of an unresolved incident), then wakes the dispatcher, counts
/// and logs it. Callers run it in a task of their own, so a request time limit never cuts a write
/// off half-way.
#[tracing::instrument(skip_all, fields(source = planned.incident.source.as_str()))]
pub async fn raise(state: &AppState, planned: &Planned) -> anyhow::Result<Created> {
    let incident = &planned.incident;
    let created = state
        .store
        .create_incident(incident, &planned.deliveries)
        .await?;
    if created.is_new {
        tracing::info!(
            incident_id = %created.incident_id,
            emergency_type = %incident.emergency_type,
            route = %incident.route,
            caller = %incident.caller.as_deref().map(mask).unwrap_or_default(),
            has_recording = incident.recording_url.is_some(),
            deliveries = created.deliveries,
            recording_fetched = incident.recording_fetch.is_some(),
            "incident stored"
        );
        if let Some(why) = &planned.not_fetched {
            // Expected for an API trigger's own audio; for an Exotel recording, a settings mistake.
            if incident.source == Source::Exotel {
                tracing::warn!(reason = %why, "the recording is not fetched: its URL is used as it is");
            } else {
                tracing::info!(reason = %why, "the audio URL is used as it is");
            }
            let detail = format!("not fetched, its URL is used as it is: {why}");
            if let Err(e) = state
                .store
                .record_incident_event(
                    &created.incident_id,
                    crate::store::recordings::event::NOT_FETCHED,
                    &detail,
                )
                .await
            {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "could not record why the recording is not fetched"
                );
            }
        }
        state.wake.notify_one();
        state
            .metrics
            .incident_created(incident.source, &incident.emergency_type, &incident.route);
    } else if incident.call_sid.is_some() {
        tracing::info!(
            incident_id = %created.incident_id,
            "repeated passthru for a stored CallSid; nothing new"
        );
    } else {
        tracing::info!(
            incident_id = %created.incident_id,
            "an incident with this dedup key is open; nothing new"
        );
    }
    Ok(created)
}

/// The incident event recording a resolution, with its reason (who, through which door).
pub const RESOLVED_EVENT: &str = "resolved";

/// Resolves one incident, cancelling its deliveries that have not gone out, and counts and logs what
/// happened. `None` when no incident has this id.
#[tracing::instrument(skip_all, fields(incident_id = %id))]
pub async fn resolve(state: &AppState, id: &str, reason: &str) -> anyhow::Result<Option<Resolved>> {
    let resolved = state.store.resolve_incident(id, reason).await?;
    if let Some(r) = &resolved {
        if r.changed {
            tracing::info!(reason, cancelled = r.cancelled.len(), "incident resolved");
            // Who resolved it, and how, stays on the incident's own trail: the cancelled deliveries'
            // events carry the reason only when something was still queued.
            if let Err(e) = state
                .store
                .record_incident_event(id, RESOLVED_EVENT, reason)
                .await
            {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "could not record who resolved the incident"
                );
            }
            for m in &r.cancelled {
                state
                    .metrics
                    .delivery_moved(m.channel, DeliveryState::Queued, m.status, true);
            }
        } else {
            tracing::info!(reason, "incident was already resolved; nothing changed");
        }
    }
    Ok(resolved)
}
