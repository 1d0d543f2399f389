//! Acknowledgement: a person says they have the emergency. The first acknowledgement moves the incident
//! to `acknowledged` and, in the same transaction, cancels the calls not yet placed and queues the
//! notices to everyone already alerted; later ones are recorded, nothing more.

use super::recordings::insert_incident_event;
use super::rows::delivery_columns;
use super::{insert_event, DeliveryRow, Moved, Store};
use crate::domain::{mask, storable, Channel, DeliveryState, IncidentState};

/// Incident event kinds written here.
pub mod event {
    /// The first acknowledgement: the incident became `acknowledged`.
    pub const ACKNOWLEDGED: &str = "acknowledged";
    /// A later acknowledgement (or one of a resolved incident): recorded, not broadcast.
    pub const ACKNOWLEDGED_AGAIN: &str = "acknowledged_again";
}

/// Who acknowledges, and through what.
#[derive(Debug, Clone)]
pub struct AckRequest {
    pub incident_id: String,
    /// The delivery acknowledged through (a call's keypress, a message's link); none for an operator.
    pub delivery_id: Option<String>,
    /// A contact's name, or the operator named.
    pub by: String,
    /// `call`, `sms`, `whatsapp`, `api`, `cli` or `console`.
    pub via: String,
    /// The provider lane that sends notices on each message channel (`exotel:sms`, …).
    pub notice_lanes: Vec<(Channel, String)>,
}

/// What an acknowledgement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledged {
    /// True for the first acknowledgement: the incident moved to `acknowledged` now.
    pub first: bool,
    /// The incident's state after it.
    pub status: IncidentState,
    /// Who acknowledged first (this request when `first`).
    pub by: Option<String>,
    /// When the first acknowledgement was, milliseconds (now when `first`).
    pub at: Option<i64>,
    /// When the incident was resolved, if it is.
    pub resolved_at: Option<i64>,
    /// The delivery's move to `acknowledged`, when it moved now.
    pub delivery_moved: Option<(Channel, DeliveryState)>,
    /// Calls not yet placed and later tiers' messages not yet sent, cancelled.
    pub cancelled: Vec<Moved>,
    /// Acknowledgement notices queued.
    pub notices: usize,
}

/// The incident as the acknowledgement leaves it.
#[derive(sqlx::FromRow)]
struct IncidentNow {
    status: String,
    acknowledged_by: Option<String>,
    acknowledged_at: Option<i64>,
    resolved_at: Option<i64>,
}

/// The first acknowledgement, only of an open incident.
const ACK_INCIDENT: &str = "UPDATE incidents SET status = 'acknowledged', acknowledged_at = $1, \
     acknowledged_by = $2, acknowledged_via = $3, acknowledged_delivery = $4 \
     WHERE id = $5 AND status = 'open'";

/// The delivery acknowledged through: from any state that may become `acknowledged` (a keypress may
/// come before the call's report, or after a guess made for want of one, or after the report queued a
/// redial that the cap now holds).
const ACK_DELIVERY: &str = "UPDATE deliveries SET status = 'acknowledged', \
     finished_at = COALESCE(finished_at, $2), updated_at = $2, last_error = NULL, report_due_at = NULL, \
     lease_owner = NULL, lease_until = NULL \
     WHERE id = $1 AND status IN ('queued', 'held', 'accepted', 'answered', 'delivered', 'read', \
       'unconfirmed', 'failed') RETURNING status";

/// Calls not placed yet (queued or held), except the delivery acknowledged through. A follow-up call
/// to the person who acknowledged is queued later, never here.
const CANCEL_UNPLACED_CALLS: &str =
    "UPDATE deliveries SET status = 'cancelled', finished_at = $1, \
     updated_at = $1, lease_owner = NULL, lease_until = NULL \
     WHERE incident_id = $2 AND channel = 'call' AND status IN ('queued', 'held') \
       AND id <> $3 RETURNING id, channel, status";

/// Escalation messages not sent yet: a later tier's SMS and WhatsApp alerts, queued (or held) for when
/// their tier comes, the unreached alarm's messages and the channel fallback's ("we could not reach you
/// by phone") still queued (a retry, a busy lane). Once someone has the emergency, the tiers that were
/// never reached and the alarm's people need not hear of it; whoever was already alerted gets the
/// acknowledgement notice instead.
const CANCEL_ESCALATION_MESSAGES: &str =
    "UPDATE deliveries SET status = 'cancelled', finished_at = $1, \
     updated_at = $1, lease_owner = NULL, lease_until = NULL \
     WHERE incident_id = $2 AND channel <> 'call' \
       AND ((purpose = 'alert' AND (tier > 0 OR run > 0)) OR purpose IN ('alarm', 'fallback')) \
       AND status IN ('queued', 'held') AND id <> $3 \
     RETURNING id, channel, status";

/// The contacts already alerted (a delivery of theirs went out, or is going out) on each message
/// channel they have in this incident, but the contact who acknowledged: `$2` and `$3` are the number
/// and the contact name of the delivery acknowledged through (empty for an operator, who is nobody's
/// delivery, whatever name they give). A name is a contact's identity (the stakeholder file refuses
/// two of one name), and it still names them should their number have changed by a reload since the
/// incident began; the number is the handset, which tells whoever holds it nothing new.
const NOTICE_RECIPIENTS: &str = "SELECT DISTINCT m.contact_name, m.phone, m.channel \
     FROM deliveries m WHERE m.incident_id = $1 AND m.channel IN ('sms', 'whatsapp') \
       AND m.purpose <> 'ack_notice' AND m.phone <> $2 AND m.contact_name <> $3 \
       AND EXISTS (SELECT 1 FROM deliveries s WHERE s.incident_id = m.incident_id \
         AND s.phone = m.phone AND s.purpose <> 'ack_notice' \
         AND (s.status IN ('sending', 'accepted', 'answered', 'acknowledged', 'delivered', 'read', \
           'unconfirmed', 'simulated') OR s.redials > 0)) \
     ORDER BY m.contact_name, m.phone, m.channel";

const INSERT_NOTICE: &str =
    "INSERT INTO deliveries (id, incident_id, contact_name, phone, channel, \
     provider, priority, greeting_ref, link_ref, purpose, status, due_at, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'ack_notice', 'queued', $10, $10, $10) \
     ON CONFLICT DO NOTHING RETURNING id";

const BY_GREETING_REF: &str = concat!(
    "SELECT ",
    delivery_columns!(),
    " FROM deliveries WHERE greeting_ref = $1"
);

const BY_ACK_REF: &str = concat!(
    "SELECT ",
    delivery_columns!(),
    " FROM deliveries WHERE ack_ref = $1"
);

impl Store {
    /// The delivery whose call carried `greeting_ref` as its CustomField.
    pub async fn delivery_by_greeting_ref(
        &self,
        greeting_ref: &str,
    ) -> anyhow::Result<Option<DeliveryRow>> {
        let row = sqlx::query_as(BY_GREETING_REF)
            .bind(greeting_ref)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row)
    }

    /// The message whose acknowledge link is `/a/<ack_ref>`.
    pub async fn delivery_by_ack_ref(&self, ack_ref: &str) -> anyhow::Result<Option<DeliveryRow>> {
        let row = sqlx::query_as(BY_ACK_REF)
            .bind(ack_ref)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row)
    }

    /// Records an acknowledgement in one transaction. The first one of an open incident moves it to
    /// `acknowledged` (who, when, how), cancels its calls not yet placed and queues one notice per
    /// message channel to each contact already alerted, never to the one who acknowledged. A later one
    /// (or one of a resolved incident) is an event. The delivery acknowledged through becomes
    /// `acknowledged` either way; a repeat changes nothing. `None` when no incident has this id.
    pub async fn acknowledge(&self, req: &AckRequest) -> anyhow::Result<Option<Acknowledged>> {
        // Locks the incident, then its deliveries, as a resolve does: a deadlock PostgreSQL ends on
        // this side is run again rather than losing the acknowledgement.
        let mut tries = 0;
        loop {
            tries += 1;
            match self.acknowledge_once(req).await {
                Err(e) if tries < 3 && super::health::is_conflict(&e) => {
                    tracing::info!(
                        error = format!("{e:#}"),
                        "acknowledgement ran into a concurrent transaction; trying again"
                    );
                }
                result => return result,
            }
        }
    }

    async fn acknowledge_once(&self, req: &AckRequest) -> anyhow::Result<Option<Acknowledged>> {
        let now = self.now_ms();
        let by = storable(&req.by).into_owned();
        let mut tx = self.writer.begin().await?;
        // The UPDATE comes first so that SQLite takes its write lock at once: two first
        // acknowledgements at the same time queue here, and only one of them broadcasts.
        let first = sqlx::query(ACK_INCIDENT)
            .bind(now)
            .bind(&by)
            .bind(&req.via)
            .bind(req.delivery_id.as_deref())
            .bind(&req.incident_id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        let current: Option<IncidentNow> = sqlx::query_as(
            "SELECT status, acknowledged_by, acknowledged_at, resolved_at FROM incidents WHERE id = $1",
        )
        .bind(&req.incident_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(IncidentNow {
            status,
            acknowledged_by: first_by,
            acknowledged_at: first_at,
            resolved_at,
        }) = current
        else {
            return Ok(None);
        };
        let status: IncidentState = status.parse()?;
        let mut delivery_moved = None;
        let mut acker: Option<DeliveryRow> = None;
        if let Some(delivery_id) = &req.delivery_id {
            let d: Option<DeliveryRow> = sqlx::query_as(concat!(
                "SELECT ",
                delivery_columns!(),
                " FROM deliveries WHERE id = $1"
            ))
            .bind(delivery_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(d) = d {
                let moved: Option<String> = sqlx::query_scalar(ACK_DELIVERY)
                    .bind(delivery_id)
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await?;
                let detail = match (&moved, first) {
                    (Some(_), true) => format!("acknowledged by {by} ({})", req.via),
                    (Some(_), false) => format!(
                        "acknowledged by {by} ({}); the incident was already {status}",
                        req.via
                    ),
                    (None, _) => format!(
                        "acknowledged by {by} ({}) again; the delivery is {}: nothing changed",
                        req.via, d.status
                    ),
                };
                if moved.is_some() {
                    delivery_moved = Some((d.channel, d.status));
                }
                insert_event(&mut *tx, &d.id, "acknowledged", None, &detail, now).await?;
                acker = Some(d);
            }
        }
        let mut cancelled = Vec::new();
        let mut notices = 0;
        if first {
            let reason = format!("not placed: {by} acknowledged the incident");
            cancelled = sqlx::query_as::<_, Moved>(CANCEL_UNPLACED_CALLS)
                .bind(now)
                .bind(&req.incident_id)
                .bind(req.delivery_id.as_deref().unwrap_or(""))
                .fetch_all(&mut *tx)
                .await?;
            for m in &cancelled {
                insert_event(&mut *tx, &m.delivery_id, "cancelled", None, &reason, now).await?;
            }
            let messages = sqlx::query_as::<_, Moved>(CANCEL_ESCALATION_MESSAGES)
                .bind(now)
                .bind(&req.incident_id)
                .bind(req.delivery_id.as_deref().unwrap_or(""))
                .fetch_all(&mut *tx)
                .await?;
            let calls = cancelled.len();
            let reason = format!("escalation stopped: {by} acknowledged the incident");
            for m in &messages {
                insert_event(&mut *tx, &m.delivery_id, "cancelled", None, &reason, now).await?;
            }
            let escalation_messages = messages.len();
            cancelled.extend(messages);
            // The acknowledging contact is known by their delivery, never by the name given: an
            // operator who types a contact's name must not keep that contact from being told.
            let recipients: Vec<(String, String, String)> = sqlx::query_as(NOTICE_RECIPIENTS)
                .bind(&req.incident_id)
                .bind(acker.as_ref().map(|d| d.phone.as_str()).unwrap_or(""))
                .bind(
                    acker
                        .as_ref()
                        .map(|d| d.contact_name.as_str())
                        .unwrap_or(""),
                )
                .fetch_all(&mut *tx)
                .await?;
            for (name, phone, channel) in recipients {
                let Some(channel) = Channel::parse(&channel) else {
                    continue;
                };
                let Some((_, lane)) = req.notice_lanes.iter().find(|(c, _)| *c == channel) else {
                    continue;
                };
                let id: Option<String> = sqlx::query_scalar(INSERT_NOTICE)
                    .bind(uuid::Uuid::new_v4().to_string())
                    .bind(&req.incident_id)
                    .bind(&name)
                    .bind(&phone)
                    .bind(channel.as_str())
                    .bind(lane)
                    .bind(channel.priority())
                    .bind(crate::messages::new_reference())
                    .bind(crate::messages::new_link_ref())
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(id) = id {
                    let detail = format!(
                        "acknowledgement notice to {name} ({}): {by} acknowledged",
                        mask(&phone)
                    );
                    insert_event(&mut *tx, &id, "queued", None, &detail, now).await?;
                    notices += 1;
                }
            }
            let detail = format!(
                "acknowledged by {by} ({}); {calls} unplaced call(s) and {escalation_messages} \
                 escalation message(s) cancelled, {notices} notice(s) queued",
                req.via,
            );
            insert_incident_event(
                &mut *tx,
                &req.incident_id,
                event::ACKNOWLEDGED,
                &detail,
                now,
            )
            .await?;
            if notices > 0 {
                if let Some(wake) = self.engine.wake_on_commit() {
                    sqlx::query(wake).execute(&mut *tx).await?;
                }
            }
        } else {
            let detail = format!(
                "acknowledged by {by} ({}); the incident was already {status}{}: recorded, not broadcast",
                req.via,
                first_by
                    .as_deref()
                    .map(|b| format!(" (first by {b})"))
                    .unwrap_or_default()
            );
            insert_incident_event(
                &mut *tx,
                &req.incident_id,
                event::ACKNOWLEDGED_AGAIN,
                &detail,
                now,
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Some(Acknowledged {
            first,
            status,
            by: first_by,
            at: first_at,
            resolved_at,
            delivery_moved,
            cancelled,
            notices,
        }))
    }

    /// Gives each message claimed without an acknowledge link reference its own, inside the claim's
    /// transaction: a link is issued only to messages that are sent. Acknowledgement notices get one
    /// too: a notice without a text of its own is the alert's, whose `{ack}` must not read "NA", and
    /// whoever is also coming can say so (a later acknowledgement, recorded).
    pub(super) async fn issue_ack_ref(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        d: &mut DeliveryRow,
    ) -> anyhow::Result<()> {
        if d.channel == Channel::Call || d.ack_ref.is_some() {
            return Ok(());
        }
        let reference = crate::messages::new_link_ref();
        sqlx::query("UPDATE deliveries SET ack_ref = $1 WHERE id = $2 AND ack_ref IS NULL")
            .bind(&reference)
            .bind(&d.id)
            .execute(&mut **tx)
            .await?;
        d.ack_ref = Some(reference);
        Ok(())
    }
}
