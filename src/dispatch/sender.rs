//! Sending one claimed delivery: the checks before the request (incident still open, lane live, the
//! provider's limits within the lease), the request itself, what its outcome means for the delivery,
//! and the hand-over of that outcome to the recorder.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::Instrument;

use super::limits::Ready;
use super::{recorder, Dispatcher, IncidentLookup, Lane};
use crate::domain::{mask, mask_numbers, Channel, DeliveryState, IncidentState, Purpose};
use crate::messages::delivery::{Facts, Fetch};
use crate::messages::MessageKind;
use crate::providers::{self, Job, Outcome, Prepared};
use crate::store::recordings::status;
use crate::store::{DeliveryRow, Finish, IncidentRow};

/// How soon a call held back by [`Dispatcher::still_ringing`] asks again, milliseconds.
const STILL_RINGING_RETRY_MS: i64 = 5_000;

impl Dispatcher {
    /// Sends one claimed delivery and records its outcome. Holds `_permit` (a place in the lane's
    /// concurrency) until the outcome is on record, so a freed permit never outruns its work.
    pub(super) async fn process(
        self: Arc<Self>,
        lane: Arc<Lane>,
        d: DeliveryRow,
        incident: IncidentLookup,
        lease_deadline: tokio::time::Instant,
        _permit: OwnedSemaphorePermit,
    ) {
        let span = tracing::info_span!(
            "delivery",
            delivery_id = %d.id,
            incident_id = %d.incident_id,
            channel = %d.channel,
            to = %mask(&d.phone),
            attempt = d.attempts,
        );
        async move {
            let finish = match incident {
                Ok(Some(incident)) => self.send(&lane, &d, &incident, lease_deadline).await,
                Ok(None) => Finish::Failed {
                    reason: "incident not found".to_owned(),
                },
                // Nothing was sent, but an incident that cannot be read may never be: spend an
                // attempt, so the retry policy bounds it.
                Err(reason) => self.after_transient(&d, reason, None),
            };
            log_finish(&finish, self.store.now_ms());
            // The outcome is kept while the lease still holds, less its margin, so a database that
            // comes back in time gets it before any other claim could.
            let keep_until = lease_deadline
                .checked_sub(self.settings.dispatch.lease_margin())
                .unwrap_or(lease_deadline);
            self.record_finish(&lane, &d, finish, keep_until).await;
        }
        .instrument(span)
        .await
    }

    /// Records the outcome of one attempt and counts it when it is final. A failure to record (the
    /// database out of reach until `keep_until`, or refusing even a plain version) is logged: the lease
    /// then expires and the delivery is sent again.
    async fn record_finish(
        &self,
        lane: &Lane,
        d: &DeliveryRow,
        finish: Finish,
        keep_until: Instant,
    ) {
        let token = d.lease_token.clone().unwrap_or_default();
        match self.record(&d.id, &token, finish, keep_until).await {
            Ok(Some(status)) => {
                self.metrics
                    .delivery_moved(d.channel, d.status, status, lane.reports_outcome())
            }
            Ok(None) => tracing::warn!("lease lost before the outcome was recorded; another claim owns it"),
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "could not record the outcome; the lease will expire and the delivery will be sent again"
            ),
        }
    }

    /// Hands the outcome to the recorder and waits until it is committed (so a permit is only freed
    /// once its work is on record); records it directly when no recorder runs. The status recorded, or
    /// `None` when the claim no longer held the lease.
    async fn record(
        &self,
        delivery_id: &str,
        token: &str,
        finish: Finish,
        keep_until: Instant,
    ) -> anyhow::Result<Option<DeliveryState>> {
        let (tx, rx) = oneshot::channel();
        if self
            .outcomes
            .send(recorder::PendingOutcome {
                delivery_id: delivery_id.to_owned(),
                token: token.to_owned(),
                finish: finish.clone(),
                keep_until,
                reply: tx,
            })
            .is_ok()
        {
            if let Ok(result) = rx.await {
                return result;
            }
        }
        let items = [(delivery_id.to_owned(), token.to_owned(), finish)];
        recorder::record_batch(&self.store, &items, keep_until)
            .await
            .pop()
            .unwrap_or_else(|| Err(anyhow::anyhow!("nothing recorded")))
    }

    /// One attempt: nothing is sent for a resolved incident or a dry-run lane, nor when the provider's
    /// limits would hold the request past its lease.
    async fn send(
        &self,
        lane: &Lane,
        d: &DeliveryRow,
        incident: &IncidentRow,
        lease_deadline: tokio::time::Instant,
    ) -> Finish {
        let recording = self.recording_status(lane.channel(), incident).await;
        let (text, dlt_template_id) = self.text_for(lane.channel(), d, incident, recording);
        let job = Job {
            delivery_id: d.id.clone(),
            channel: lane.channel(),
            phone: d.phone.clone(),
            greeting_ref: d.greeting_ref.clone(),
            text,
            dlt_template_id,
        };
        let prepared = lane.client().prepare(&job);
        // Resolved between queueing and now (another replica, the API, Alertmanager): nobody is paged.
        if !incident.status.sends() {
            return Finish::Cancelled {
                reason: format!("incident {} before this was sent", incident.status),
            };
        }
        // Someone acknowledged: nobody else is called (a retry or a lease expiry can bring a call
        // back to the queue after the acknowledgement cancelled the queued ones). Only the follow-up
        // call that plays the recording to the person who acknowledged still goes.
        if lane.channel() == Channel::Call
            && incident.status == IncidentState::Acknowledged
            && d.purpose != Purpose::Followup
        {
            return Finish::Cancelled {
                reason: format!(
                    "incident acknowledged by {} before this call was placed",
                    incident.acknowledged_by.as_deref().unwrap_or("someone")
                ),
            };
        }
        // Likewise a later tier's message, an alarm message or a fallback message that came back to
        // the queue (a retry) after the acknowledgement stopped the escalation: it was never needed.
        if lane.channel() != Channel::Call
            && incident.status == IncidentState::Acknowledged
            && ((d.purpose == Purpose::Alert && (d.tier > 0 || d.run > 0))
                || d.purpose == Purpose::Alarm
                || d.purpose == Purpose::Fallback)
        {
            return Finish::Cancelled {
                reason: format!(
                    "escalation stopped: {} acknowledged the incident before this was sent",
                    incident.acknowledged_by.as_deref().unwrap_or("someone")
                ),
            };
        }
        if !lane.live {
            return Finish::Simulated {
                request: prepared.redacted_json(),
            };
        }
        if let Some(wait) = self.still_ringing(lane, d).await {
            return wait;
        }
        // The request, and the recording of its outcome, must fit in the lease.
        let needed = prepared.timeout + self.settings.dispatch.lease_margin();
        let latest_start = lease_deadline.checked_sub(needed).unwrap_or(lease_deadline);
        match lane.limits.ready(latest_start).await {
            Ready::TooLate { retry_in } => {
                return Finish::Requeue {
                    due_at: self.store.now_ms() + retry_in.as_millis() as i64,
                    reason: "the provider's limits would have held it past its lease".to_owned(),
                };
            }
            Ready::Go { waited: false } => {}
            Ready::Go { waited: true } => {
                // It waited: the incident may have been resolved meanwhile, and the lease shortened.
                if let Some(stop) = self.resolved_while_waiting(&incident.id).await {
                    return stop;
                }
                if let Some(stop) = self.renew_after_wait(d).await {
                    return stop;
                }
            }
        }
        if let Some(stop) = self.acknowledged_since_claim(lane, d, incident).await {
            return stop;
        }
        let outcome = self.execute(lane, &prepared).await;
        self.finish_for(lane, d, outcome)
    }

    /// A redial, a later tier's or pass's call, or an alarm call is placed only while nobody has
    /// acknowledged: the incident read at the claim may be a moment old, and an acknowledgement in that
    /// moment would otherwise ring someone who is no longer needed. One read, just before the request;
    /// the first call of the first tier skips it (nobody can have acknowledged an alert not yet sent
    /// but through another contact's call, and that call's read already raced the same way).
    async fn acknowledged_since_claim(
        &self,
        lane: &Lane,
        d: &DeliveryRow,
        claimed: &IncidentRow,
    ) -> Option<Finish> {
        let escalating = d.tier > 0 || d.run > 0 || d.redials > 0 || d.purpose == Purpose::Alarm;
        if lane.channel() != Channel::Call
            || !escalating
            || d.purpose == Purpose::Followup
            || claimed.status != IncidentState::Open
        {
            return None;
        }
        match self.store.incident(&d.incident_id).await {
            Ok(Some(now)) if now.status != IncidentState::Open => Some(Finish::Cancelled {
                reason: match now.acknowledged_by.as_deref() {
                    Some(by) => format!("{by} acknowledged the incident just before this call"),
                    None => format!("incident {} just before this call", now.status),
                },
            }),
            Ok(_) => None,
            // Unknown: call rather than drop a call that may still be needed.
            Err(e) => {
                tracing::warn!(
                    delivery_id = %d.id,
                    error = format!("{e:#}"),
                    "could not re-read the incident before the call; calling"
                );
                None
            }
        }
    }

    /// A call to a contact whose other call of the incident still rings (a later tier's call, a
    /// redial, an alarm call): handed back for a few seconds instead of ringing the same phone twice
    /// at once. Only a first attempt of the first tier and pass skips the question (nothing can ring
    /// before it, and the common call costs no read). Bounded: a call accepted longer ago than the
    /// ring time and the margin no longer counts. Should the question fail, the call goes (a
    /// duplicate call is better than a missed one).
    async fn still_ringing(&self, lane: &Lane, d: &DeliveryRow) -> Option<Finish> {
        let first_of_all =
            d.tier == 0 && d.run == 0 && d.redials == 0 && d.purpose != Purpose::Alarm;
        if lane.channel() != Channel::Call || first_of_all {
            return None;
        }
        match self
            .store
            .call_in_flight(
                &d.incident_id,
                &d.phone,
                &d.id,
                (d.tier, d.run),
                self.call_window_ms,
            )
            .await
        {
            Ok(true) => Some(Finish::Requeue {
                due_at: self.store.now_ms() + STILL_RINGING_RETRY_MS,
                reason: "an earlier call to this contact is still ringing; placed once it ends"
                    .to_owned(),
            }),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(
                    delivery_id = %d.id,
                    error = format!("{e:#}"),
                    "cannot tell whether an earlier call still rings; calling"
                );
                None
            }
        }
    }

    /// After waiting for the provider's limits: `Cancelled` when the incident was resolved meanwhile.
    async fn resolved_while_waiting(&self, incident_id: &str) -> Option<Finish> {
        match self.store.incident(incident_id).await {
            Ok(Some(now)) if !now.status.sends() => Some(Finish::Cancelled {
                reason: format!(
                    "incident {} while this waited for the provider's limits; not sent",
                    now.status
                ),
            }),
            Ok(_) => None,
            // Unknown: send rather than drop an alert that may still be needed.
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "could not re-read the incident after waiting; sending"
                );
                None
            }
        }
    }

    /// After waiting for the provider's limits the lease may be short: renew it for the request, or
    /// hand the delivery back (`Requeue`) when this claim cannot be sure it still holds it.
    async fn renew_after_wait(&self, d: &DeliveryRow) -> Option<Finish> {
        let renewed = self
            .store
            .renew_lease(
                &d.id,
                d.lease_token.as_deref().unwrap_or_default(),
                self.lease,
            )
            .await;
        match renewed {
            Ok(true) => None,
            // Another claim owns it now: sending could call twice.
            Ok(false) => Some(Finish::Requeue {
                due_at: self.store.now_ms(),
                reason: "its lease was lost while it waited for the provider's limits".to_owned(),
            }),
            // The database cannot say: hand it back rather than risk a second call.
            Err(e) => Some(Finish::Requeue {
                due_at: self.store.now_ms(),
                reason: format!(
                    "its lease could not be renewed after waiting for the provider's limits: {e:#}"
                ),
            }),
        }
    }

    /// Makes the request and classifies the answer, timing it for the metrics.
    async fn execute(&self, lane: &Lane, prepared: &Prepared) -> Outcome {
        let started = std::time::Instant::now();
        let outcome = match providers::execute(&self.http, prepared).await {
            Ok(answer) => {
                let outcome = lane.client().classify(&answer);
                let accepted = matches!(outcome, Outcome::Accepted { .. });
                self.watch_account(lane, prepared, &answer, accepted).await;
                outcome
            }
            Err(transport) => transport,
        };
        let label = match &outcome {
            Outcome::Accepted { .. } => "accepted",
            Outcome::Transient { .. } => "transient",
            Outcome::Permanent { .. } => "permanent",
        };
        self.metrics.provider_request(
            lane.channel().as_str(),
            label,
            started.elapsed().as_secs_f64(),
        );
        outcome
    }

    /// What the provider's answer means for the delivery. A provider that asks us to slow down pauses
    /// the whole lane, within `retry_after_max`.
    fn finish_for(&self, lane: &Lane, d: &DeliveryRow, outcome: Outcome) -> Finish {
        match outcome {
            Outcome::Accepted {
                provider_id,
                detail,
            } => Finish::Accepted {
                provider_id,
                detail,
                report_due_at: lane.client().reports_outcome().then(|| {
                    self.store.now_ms() + (self.settings.dispatch.report_wait_secs * 1000.0) as i64
                }),
            },
            Outcome::Permanent { reason } => Finish::Failed { reason },
            Outcome::Transient {
                reason,
                retry_after,
            } => {
                if let Some(wait) = retry_after {
                    let bounded = wait.min(self.retry.retry_after_max);
                    tracing::warn!(
                        pause_ms = bounded.as_millis() as u64,
                        "provider asked us to slow down"
                    );
                    lane.limits.pause.pause_for(bounded);
                }
                self.after_transient(d, reason, retry_after)
            }
        }
    }

    /// A passing failure: try again after the retry policy's wait, or fail for good once the policy
    /// is spent.
    fn after_transient(
        &self,
        d: &DeliveryRow,
        reason: String,
        retry_after: Option<Duration>,
    ) -> Finish {
        let age = Duration::from_millis((self.store.now_ms() - d.created_at).max(0) as u64);
        match self.retry.next_wait(d.attempts as u32, age, retry_after) {
            Some(wait) => Finish::Retry {
                due_at: self.store.now_ms() + wait.as_millis() as i64,
                reason,
            },
            None => Finish::Failed {
                reason: format!("gave up after {} attempts; last: {reason}", d.attempts),
            },
        }
    }

    /// In proxy mode, where the recording we fetch for this incident stands (`NotFetched`: none is
    /// fetched, the recording URL, if any, is used as it is). Only messages need it. A failed read
    /// counts as still being fetched: the message then carries our link, which works once the
    /// recording is in.
    async fn recording_status(&self, channel: Channel, incident: &IncidentRow) -> Fetch {
        if channel == Channel::Call
            || incident.recording_url.is_none()
            || !self.texts.proxies_recordings()
        {
            return Fetch::NotFetched;
        }
        match self.store.recording(&incident.id).await {
            Ok(None) => Fetch::NotFetched,
            Ok(Some(job)) if job.status == status::PENDING || job.status == status::STORED => {
                Fetch::Usable
            }
            Ok(Some(_)) => Fetch::Gone,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "cannot read the recording's status"
                );
                Fetch::Usable
            }
        }
    }

    /// The SMS or WhatsApp text of the delivery, and the DLT template id it is registered under (SMS
    /// only): the store's rows handed to `messages` as plain facts.
    fn text_for(
        &self,
        channel: Channel,
        d: &DeliveryRow,
        incident: &IncidentRow,
        recording: Fetch,
    ) -> (String, String) {
        let facts = Facts {
            kind: MessageKind::for_delivery(d.purpose, incident.source),
            name: &d.contact_name,
            link_ref: d.link_ref.as_deref(),
            greeting_ref: &d.greeting_ref,
            ack_ref: d.ack_ref.as_deref(),
            incident: &incident.id,
            source: incident.source,
            emergency_type: &incident.emergency_type,
            caller: incident.caller.as_deref(),
            message: incident.message.as_deref(),
            recording_url: incident.recording_url.as_deref(),
            recording,
            occurred_at: incident.occurred_at,
            received_at: incident.received_at,
            acknowledged_by: incident.acknowledged_by.as_deref(),
            acknowledged_at: incident.acknowledged_at,
            now_ms: self.store.now_ms(),
        };
        self.texts.compose(channel, &facts)
    }
}

/// Logs what the attempt came to, with any phone number in a provider's text masked.
fn log_finish(finish: &Finish, now: i64) {
    match finish {
        Finish::Accepted { provider_id, .. } => {
            tracing::info!(
                provider_id = provider_id.as_deref().unwrap_or("-"),
                "accepted by provider"
            )
        }
        Finish::Simulated { .. } => tracing::info!("dry-run: simulated"),
        Finish::Retry { reason, due_at } | Finish::Requeue { reason, due_at } => {
            tracing::warn!(reason = %mask_numbers(reason), retry_in_ms = due_at - now, "not delivered yet; will try again")
        }
        Finish::Failed { reason } => {
            tracing::error!(reason = %mask_numbers(reason), "DELIVERY FAILED")
        }
        Finish::Cancelled { reason } => tracing::info!(reason = %mask_numbers(reason), "cancelled"),
    }
}
